"""Shared fixtures: a real gradwire server on 127.0.0.1 serving tiny-random,
in this process (so tests can read the engine's weights and gradients) or as
a `gradwire-server` subprocess."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import pytest  # noqa: E402
from google.longrunning import operations_pb2_grpc  # noqa: E402

import gradwire  # noqa: E402
from gradwire.v1 import training_service_pb2_grpc as pb_grpc  # noqa: E402
from gradwire_server.server import BackgroundServer, ServerConfig  # noqa: E402


# Every test server is float32 (exactness is tested against in-process float32 references; bf16
# has its own tests) with the CPU's KV cache size: on CUDA the default takes 0.25 of the free
# memory, and the suite may run many servers side by side on one card.
TEST_DTYPE, TEST_KV_CACHE_MB = "float32", 512


def server_config(**fields) -> ServerConfig:
    """A tiny-random ServerConfig on a free port with the test defaults and a fresh checkpoint
    folder (a folder serves one server at a time); `fields` override."""
    return ServerConfig(**{"model": "tiny-random", "port": 0, "dtype": TEST_DTYPE, "kv_cache_mb": TEST_KV_CACHE_MB,
                           "checkpoint_dir": tempfile.mkdtemp(prefix="gradwire-test-checkpoints-"), **fields})


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """An in-process server; `server.engine` is its engine, `server.call(fn)` runs fn on its worker,
    `server.server.checkpoint_root` its (temporary) checkpoint folder."""
    # Checkpoint expiry sweeps only when a test calls server.expire_checkpoints(): a periodic
    # one could delete an expired checkpoint between a test's expiry and its checks.
    background = BackgroundServer(server_config(checkpoint_dir=tmp_path_factory.mktemp("checkpoints"),
                                                checkpoint_expiry_interval_s=1e6))
    yield background
    background.stop()


@pytest.fixture(scope="session")
def service(server):
    client = gradwire.ServiceClient(base_url=server.address)
    yield client
    client.close()


@contextlib.contextmanager
def raw_stubs(address: str):
    """Raw (TrainingService, Operations) stubs of the server at `address`, as a client in
    another language uses them; their channel closes when the block ends."""
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.TrainingServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)


@pytest.fixture()
def stubs(server):
    """raw_stubs of the session's in-process server."""
    with raw_stubs(server.address) as training_and_operations:
        yield training_and_operations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(*args: str) -> tuple[subprocess.Popen, str]:
    """Starts `python -m gradwire_server --model tiny-random` on a free port and
    waits for its "listening" line; its output keeps draining into a thread."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gradwire_server", "--model", "tiny-random", "--port", str(port),
         "--dtype", TEST_DTYPE, "--kv-cache-mb", str(TEST_KV_CACHE_MB), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listening = threading.Event()
    output: list[str] = []

    def drain() -> None:
        for line in process.stdout:
            output.append(line)
            if "gradwire-server listening on" in line:
                listening.set()

    threading.Thread(target=drain, daemon=True).start()
    if not listening.wait(timeout=120):
        process.kill()
        pytest.fail("gradwire-server did not start:\n" + "".join(output))
    return process, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def cli_server(tmp_path_factory):
    """A `gradwire-server` subprocess serving tiny-random; yields its address."""
    process, address = start_cli_server("--checkpoint-dir", str(tmp_path_factory.mktemp("cli-checkpoints")))
    yield address
    process.terminate()
    process.wait(timeout=30)
