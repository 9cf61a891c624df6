"""Checkpoints on disk: gradwire:// paths, the folder format, atomic writing.

    gradwire://<run_id>/weights/<name>          training state (adapter + optimizer)
    gradwire://<run_id>/sampler_weights/<name>  adapter only, for sampling

live under the checkpoint root as `<root>/<run_id>/<weights|sampler_weights>/<name>/`:

    adapter_config.json        peft LoraConfig: PeftModel.from_pretrained(base, folder) loads it
    adapter_model.safetensors  the adapter's tensors under peft's state-dict names
    optimizer.pt               (weights/ only) torch.save of the AdamW state_dict
    gradwire_checkpoint.json   written last: format version, run, step, LoRA settings, base
                               model, and the size and sha256 of every other file

A folder is written as a hidden temporary sibling, every file fsynced, renamed
into place, and the parent fsynced (as is the parent of every folder created
above it): a crash leaves either nothing or a temporary
folder (hidden, never listed or loadable), never a half checkpoint. A folder
without its gradwire_checkpoint.json is not a checkpoint. Saving an existing
name is ALREADY_EXISTS, unless the save asks to overwrite: then the new folder
and the old one swap names in one renameat2(RENAME_EXCHANGE) (rename(2) cannot
replace a non-empty folder), and the old one is deleted.

A checkpoint saved with a TTL records `expires_time` in its marker: from then on
it is treated as absent (find() says NOT_FOUND, listings leave it out, a save of
its name replaces it as an overwrite does) and the server's sweep deletes it.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import safetensors.torch
import torch

from gradwire_server.batch import LoraSettings
from gradwire_server.engine import RunState
from gradwire_server.errors import (FieldViolation, ServiceError, already_exists, checkpoint_replaced, data_loss,
                                    failed_precondition, invalid_argument, not_found)
from gradwire_server.run_index import CheckpointRecord, RunRecord

SCHEME = "gradwire://"
FORMAT_VERSION = 1
MARKER = "gradwire_checkpoint.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
KINDS = {"weights": "training", "sampler_weights": "sampler"}  # path kind -> checkpoint_type
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEMP_PREFIX = ".tmp-"
CRASH_AT_ENV = "GRADWIRE_CHECKPOINT_CRASH_AT"  # tests only: see _crash_point
CRASH_EXIT_CODE = 86


@dataclass(frozen=True)
class CheckpointPath:
    """A parsed gradwire:// checkpoint path."""

    run_id: str
    kind: str   # "weights" or "sampler_weights"
    name: str

    @property
    def path(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_type(self) -> str:
        """Tinker's name for the kind: "training" or "sampler"."""
        return KINDS[self.kind]

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    def folder(self, root: pathlib.Path) -> pathlib.Path:
        return root / self.run_id / self.kind / self.name


@dataclass
class Checkpoint:
    """A complete checkpoint folder and what its marker says."""

    path: CheckpointPath
    folder: pathlib.Path
    metadata: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk, marker included."""
        return sum((self.folder / name).stat().st_size for name in [*self.metadata["files"], MARKER])

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(**self.metadata["lora"])

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    def run_record(self) -> RunRecord:
        """What it says of its run, for an index that lost the run's row (the run's own
        metadata is not in a checkpoint; it was not loaded by this process)."""
        created = self.metadata["created_time"]
        return RunRecord(run_id=self.path.run_id, base_model=self.metadata["base_model"], lora=self.lora,
                         user_metadata={}, created_time=created, last_request_time=created, last_step=self.step,
                         loaded=False, source_checkpoint=None)

    def record(self) -> CheckpointRecord:
        """Its row in the run index."""
        return CheckpointRecord(path=self.path.path, run_id=self.path.run_id,
                                checkpoint_type=self.path.checkpoint_type, name=self.path.name,
                                created_time=self.metadata["created_time"], size_bytes=self.size_bytes,
                                expires_time=self.metadata.get("expires_time"))


def validate_name(name: str, field: str = "name") -> str:
    """A checkpoint name: 1-128 of [A-Za-z0-9._-], not starting with '.', '_' or '-'
    (so no '/', '..', empty or hidden names can leave or shadow the folder)."""
    if not _NAME.fullmatch(name):
        raise invalid_argument([FieldViolation(
            field, f"{name!r} is not a valid checkpoint name: use 1-128 letters, digits, '.', '_' "
                   "or '-', starting with a letter or digit")])
    return name


def parse_path(path: str, field: str = "path") -> CheckpointPath:
    """Parses `gradwire://<run_id>/<weights|sampler_weights>/<name>` (INVALID_ARGUMENT if malformed)."""
    def bad(why: str) -> ServiceError:
        return invalid_argument([FieldViolation(field, f"{path!r} is not a checkpoint path: {why}")])

    if not path.startswith(SCHEME):
        raise bad(f"expected {SCHEME}<run_id>/weights/<name> or {SCHEME}<run_id>/sampler_weights/<name>")
    parts = path[len(SCHEME):].split("/")
    if len(parts) != 3:
        raise bad("expected three parts after the scheme: <run_id>/<kind>/<name>")
    run_id, kind, name = parts
    if kind not in KINDS:
        raise bad(f"kind {kind!r} is neither 'weights' nor 'sampler_weights'")
    if not _NAME.fullmatch(run_id):
        raise bad(f"run id {run_id!r} is malformed")
    if not _NAME.fullmatch(name):
        raise bad(f"name {name!r} is malformed")
    return CheckpointPath(run_id, kind, name)


def find(root: pathlib.Path, path: str, field: str = "path", include_expired: bool = False) -> Checkpoint:
    """The complete checkpoint at `path`: INVALID_ARGUMENT if malformed, NOT_FOUND if
    there is none (a folder without its marker is no checkpoint) or, unless
    include_expired, its TTL ran out."""
    parsed = parse_path(path, field)
    folder = parsed.folder(root)
    try:
        metadata = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        raise not_found("checkpoint", path) from None
    except (OSError, ValueError) as error:
        raise data_loss(f"checkpoint {path}: {MARKER} is unreadable ({error})") from None
    if expired(metadata) and not include_expired:
        raise not_found("checkpoint", path, "its TTL ran out")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise failed_precondition(f"checkpoint {path} has format version "
                                  f"{metadata.get('format_version')!r}; this server reads "
                                  f"{FORMAT_VERSION}", "CHECKPOINT_FORMAT")
    if (metadata.get("run_id"), metadata.get("kind"), metadata.get("name")) != \
            (parsed.run_id, parsed.kind, parsed.name):
        raise data_loss(f"the folder of checkpoint {path} holds a copy of "
                        f"{SCHEME}{metadata.get('run_id')}/{metadata.get('kind')}/{metadata.get('name')}; "
                        "checkpoint folders must not be moved or copied by hand")
    return Checkpoint(parsed, folder, metadata)


def checkpoint_directory(checkpoint_root: pathlib.Path, path: str) -> pathlib.Path:
    """The folder of the complete checkpoint at `path` (e.g. for loading sampler
    weights with peft); raises ServiceError (INVALID_ARGUMENT, NOT_FOUND) otherwise."""
    return find(pathlib.Path(checkpoint_root), path).folder


def check_base_model(checkpoint: Checkpoint, base_model: str) -> None:
    """FAILED_PRECONDITION unless the checkpoint was trained on `base_model`."""
    if checkpoint.metadata.get("base_model") != base_model:
        raise failed_precondition(
            f"checkpoint {checkpoint.path.path} is an adapter of base model "
            f"{checkpoint.metadata.get('base_model')!r}; this server serves {base_model!r}",
            "BASE_MODEL_MISMATCH")


def expired(metadata: dict[str, Any]) -> bool:
    """Whether a checkpoint's TTL has run out."""
    expires = metadata.get("expires_time")
    return expires is not None and expires <= time.time()


def check_new(root: pathlib.Path, path: CheckpointPath) -> None:
    """ALREADY_EXISTS if the name is taken: by anything but a checkpoint whose TTL ran out
    (gone for every reader, its folder waiting for the sweep), which a save replaces."""
    if not path.folder(root).exists():
        return
    try:
        if expired(find(root, path.path, include_expired=True).metadata):
            return
    except ServiceError:  # no marker, a damaged one, another format: taken all the same
        pass
    raise _exists(path.path)


def _exists(path: str) -> ServiceError:
    return already_exists(f"checkpoint {path} already exists; choose another name", "CHECKPOINT_EXISTS")


def write(root: pathlib.Path, path: CheckpointPath, state: RunState, base_model: str,
          ttl_seconds: int | None = None, overwrite: bool = False,
          user_metadata: dict[str, str] | None = None) -> Checkpoint:
    """Writes the state as a checkpoint folder, atomically (see the module doc).
    The optimizer file is written when state.optimizer is set; with ttl_seconds
    it expires that long after now; with overwrite it replaces a checkpoint of
    the same name."""
    if not overwrite:
        check_new(root, path)
    folder = path.folder(root)
    _make_parents(folder)
    temp = folder.parent / f"{_TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        (temp / ADAPTER_CONFIG).write_text(json.dumps(_adapter_config(state, base_model), indent=2))
        safetensors.torch.save_file(state.adapter, str(temp / ADAPTER_WEIGHTS),
                                    metadata={"format": "pt"})
        shutil.copymode(temp / ADAPTER_CONFIG, temp / ADAPTER_WEIGHTS)  # safetensors writes 0600
        if state.optimizer is not None:
            torch.save(state.optimizer, temp / OPTIMIZER_STATE)
        files = {}
        for file in sorted(temp.iterdir()):
            _fsync(file)
            with open(file, "rb") as handle:
                files[file.name] = {"size": file.stat().st_size, "sha256": _sha256(handle)}
        now = time.time()
        metadata = {"format_version": FORMAT_VERSION, "run_id": path.run_id, "kind": path.kind,
                    "name": path.name, "base_model": base_model, "lora": asdict(state.lora),
                    "step": state.step, "created_time": now, "files": files,
                    "expires_time": None if ttl_seconds is None else now + ttl_seconds,
                    "user_metadata": dict(user_metadata or {})}
        _crash_point("before_marker")
        (temp / MARKER).write_text(json.dumps(metadata, indent=2))
        _crash_point("after_marker")
        _fsync(temp / MARKER)
        _fsync(temp)
        _crash_point("before_rename")
        if folder.exists():  # overwrite, or an expired checkpoint (check_new)
            _exchange(temp, folder)  # temp now holds the old checkpoint
            shutil.rmtree(temp, ignore_errors=True)
        else:
            _rename_into_place(temp, folder, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _crash_point("after_rename")
    _fsync(folder.parent)
    return Checkpoint(path, folder, metadata)


def set_expiry(checkpoint: Checkpoint, expires_time: float | None) -> Checkpoint:
    """The checkpoint with its marker's expires_time replaced (None: never expires),
    written to a hidden file and renamed over the marker, so the marker is always whole."""
    metadata = {**checkpoint.metadata, "expires_time": expires_time}
    temp = checkpoint.folder / f"{_TEMP_PREFIX}{MARKER}-{secrets.token_hex(4)}"
    try:
        temp.write_text(json.dumps(metadata, indent=2))
        _fsync(temp)
        os.replace(temp, checkpoint.folder / MARKER)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(checkpoint.folder)
    return Checkpoint(checkpoint.path, checkpoint.folder, metadata)


def read(checkpoint: Checkpoint, with_optimizer: bool
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(adapter tensors, optimizer state or None), after checking every file's size
    and sha256 against the marker: DATA_LOSS naming the file if one is damaged."""
    files = [ADAPTER_WEIGHTS] + ([OPTIMIZER_STATE] if with_optimizer else [])
    for name in files:
        verify(checkpoint, name)
    try:
        adapter = safetensors.torch.load_file(str(checkpoint.folder / ADAPTER_WEIGHTS))
        optimizer = torch.load(checkpoint.folder / OPTIMIZER_STATE, weights_only=True) \
            if with_optimizer else None
    except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
        raise data_loss(f"checkpoint {checkpoint.path.path} cannot be decoded: {error}") from None
    return adapter, optimizer


def delete(checkpoint: Checkpoint) -> None:
    """Removes a checkpoint: renamed to a hidden name first, so it vanishes at once
    (NOT_FOUND if it is gone already)."""
    doomed = checkpoint.folder.parent / f"{_TEMP_PREFIX}deleted-{checkpoint.path.name}-{secrets.token_hex(4)}"
    try:
        checkpoint.folder.rename(doomed)
    except FileNotFoundError:
        raise not_found("checkpoint", checkpoint.path.path) from None
    _fsync(checkpoint.folder.parent)
    shutil.rmtree(doomed)


def open_for_download(checkpoint: Checkpoint) -> list[tuple[str, BinaryIO]]:
    """(name, open file) of each of the checkpoint's files, marker last, each checked against
    the marker from that very handle and rewound: what is read from them is what was checked,
    even if the folder is replaced or deleted meanwhile. DATA_LOSS naming a damaged file;
    NOT_FOUND if the checkpoint is gone, ABORTED if it was saved again since it was found."""
    opened: list[tuple[str, BinaryIO]] = []
    try:
        for name in [*sorted(checkpoint.metadata["files"]), MARKER]:
            try:
                handle = open(checkpoint.folder / name, "rb")
            except FileNotFoundError:
                raise not_found("checkpoint", checkpoint.path.path) from None
            opened.append((name, handle))
            if name != MARKER:
                _check(checkpoint, name, handle)
                handle.seek(0)
    except BaseException:
        for _, handle in opened:
            handle.close()
        raise
    return opened


def scan(root: pathlib.Path) -> Iterator[Checkpoint]:
    """Every complete checkpoint under the root, expired ones included (temporary and
    unmarked folders skipped)."""
    for marker in sorted(root.glob(f"*/*/*/{MARKER}")):
        folder = marker.parent
        try:
            yield find(root, f"{SCHEME}{folder.parent.parent.name}/{folder.parent.name}/{folder.name}",
                       include_expired=True)
        except ServiceError:
            continue


def remove_leftovers(root: pathlib.Path) -> list[pathlib.Path]:
    """Deletes the temporary folders of saves and deletions a crash interrupted
    (at start-up, when no save is running); returns them."""
    leftovers = sorted(root.glob(f"*/*/{_TEMP_PREFIX}*"))
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    return leftovers


def _make_parents(folder: pathlib.Path) -> None:
    """Creates the missing folders above `folder` (`<run_id>/`, `<run_id>/<kind>/`), each
    followed by an fsync of its parent, so that the new names survive a crash too."""
    missing = [parent for parent in folder.parents if not parent.exists()]
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # made meanwhile by another save
            continue
        _fsync(new.parent)


def _rename_into_place(temp: pathlib.Path, folder: pathlib.Path, path: CheckpointPath) -> None:
    """Renames the finished temporary folder to its name: ALREADY_EXISTS if a folder of
    that name appeared meanwhile (rename(2) refuses a non-empty target)."""
    try:
        temp.rename(folder)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise _exists(path.path) from None


def _exchange(new: pathlib.Path, old: pathlib.Path) -> None:
    """Swaps two folders' names atomically (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot swap {new} and {old}: {os.strerror(error)}")


def verify(checkpoint: Checkpoint, name: str) -> None:
    """DATA_LOSS naming the file unless `name` has the size and sha256 the marker records."""
    if name not in checkpoint.metadata["files"]:
        raise failed_precondition(f"checkpoint {checkpoint.path.path}: {name} is not part of this checkpoint",
                                  "CHECKPOINT_KIND")
    file = checkpoint.folder / name
    try:
        with open(file, "rb") as handle:
            _check(checkpoint, name, handle)
    except FileNotFoundError:
        check_unchanged(checkpoint)
        raise data_loss(f"checkpoint {checkpoint.path.path}: {name} is missing") from None


def _check(checkpoint: Checkpoint, name: str, handle: BinaryIO) -> None:
    """DATA_LOSS unless the open file has the size and sha256 the marker records for `name`."""
    expected = checkpoint.metadata["files"][name]
    where = f"checkpoint {checkpoint.path.path}: {name}"
    size = os.fstat(handle.fileno()).st_size
    if size != expected["size"]:
        check_unchanged(checkpoint)
        raise data_loss(f"{where} has {size} bytes, expected {expected['size']} (truncated or damaged)")
    if _sha256(handle) != expected["sha256"]:
        check_unchanged(checkpoint)
        raise data_loss(f"{where} does not match its sha256 (damaged)")


def check_unchanged(checkpoint: Checkpoint) -> None:
    """Before a file that is missing or does not match reads as damage: NOT_FOUND if the
    checkpoint was deleted since it was found (e.g. while a request naming it waited for
    the worker), ABORTED if it was saved again meanwhile (its files are other files now)."""
    try:
        metadata = json.loads((checkpoint.folder / MARKER).read_text())
    except FileNotFoundError:
        raise not_found("checkpoint", checkpoint.path.path, "deleted since this request found it") from None
    except (OSError, ValueError):
        return  # an unreadable marker is damage too
    if metadata.get("files") != checkpoint.metadata["files"]:
        raise checkpoint_replaced(checkpoint.path.path)


def _adapter_config(state: RunState, base_model: str) -> dict[str, Any]:
    """peft's adapter_config.json: JSON-ready, inference_mode off (PeftModel.from_pretrained
    sets it from is_trainable anyway), naming the server's base model."""
    config = {key: sorted(value) if isinstance(value, set) else value
              for key, value in state.adapter_config.items()}
    config.update(inference_mode=False, base_model_name_or_path=base_model)
    return config


def _sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _crash_point(step: str) -> None:
    """Fault injection for the crash-safety tests: the process dies on the spot (no
    cleanup, like a power cut or SIGKILL) when $GRADWIRE_CHECKPOINT_CRASH_AT names this
    step of write() (before_marker, after_marker, before_rename, after_rename)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        os._exit(CRASH_EXIT_CODE)


def _fsync(path: pathlib.Path) -> None:
    """fsync a file or a folder (a folder's entries: new names survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
