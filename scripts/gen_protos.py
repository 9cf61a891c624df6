#!/usr/bin/env python3
"""Regenerate the Python stubs in sdk/gradwire/v1/ from protos/gradwire/v1/.

Usage: python scripts/gen_protos.py [--out DIR]

googleapis-common-protos ships google/longrunning/operations.proto under the
name operations_proto.proto, so a copy under the expected name goes into a
temporary include folder for the duration of the run (nothing is vendored).
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

import google.longrunning.operations_proto_pb2 as operations_proto_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "sdk"


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Writes gradwire/v1/*_pb2*.py under out_root; returns the files written."""
    googleapis = pathlib.Path(operations_proto_pb2.__file__).parent.parent.parent
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.glob("gradwire/v1/*.proto"))
    out_dir = out_root / "gradwire" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as include:
        longrunning = pathlib.Path(include) / "google" / "longrunning"
        longrunning.mkdir(parents=True)
        shutil.copy(googleapis / "google" / "longrunning" / "operations_proto.proto",
                    longrunning / "operations.proto")
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"-I{googleapis}",
                f"-I{well_known}", f"--python_out={out_root}", f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}", *map(str, protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Stubs generated from protos/gradwire/v1 by scripts/gen_protos.py."""\n')
    return sorted(out_dir.glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="folder that receives gradwire/v1/ (default: sdk/)")
    for path in generate(parser.parse_args().out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path, file=sys.stderr)


if __name__ == "__main__":
    main()
