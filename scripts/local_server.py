"""Starts a `gradwire-server` subprocess for the scripts here (benchmarks, examples)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator


def start_server(model: str, *args: str) -> tuple[subprocess.Popen, str]:
    """`gradwire-server --model MODEL --port 0 ARGS...` and its address, once it listens.
    Without --checkpoint-dir in ARGS it gets a fresh temporary one (a folder serves one server
    at a time). Its output keeps draining in a thread, so it never blocks on a full pipe."""
    if "--checkpoint-dir" not in args:
        args = (*args, "--checkpoint-dir", tempfile.mkdtemp(prefix="gradwire-checkpoints-"))
    process = subprocess.Popen([sys.executable, "-m", "gradwire_server", "--model", model, "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in process.stdout:
            if not address and "gradwire-server listening on " in line:
                address.append(line.rsplit("listening on ", 1)[1].strip())
                ready.set()
        ready.set()  # the server exited

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(timeout=300)
    if not address:
        process.kill()
        process.wait()
        raise RuntimeError(f"gradwire-server --model {model} did not start")
    return process, address[0]


@contextlib.contextmanager
def local_server(model: str, *args: str) -> Iterator[str]:
    """A server with its own temporary checkpoint folder; yields its address, stops it after."""
    with tempfile.TemporaryDirectory() as workdir:
        process, address = start_server(model, "--checkpoint-dir", os.path.join(workdir, "checkpoints"), *args)
        try:
            yield address
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
