"""Builds and runs the gRPC server: training, operations, health, reflection.

The port opens at once with health NOT_SERVING; the model loads; then health
turns SERVING and one line `gradwire-server listening on HOST:PORT` is logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire.v1 import sampling_service_pb2, sampling_service_pb2_grpc
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import checkpoint_ops, checkpoints
from gradwire_server.attention import use_attention
from gradwire_server.engine import KEEP_GRAPH_TIMEOUT_S, Engine
from gradwire_server.errors import stopping
from gradwire_server.folder_lock import FolderInUse, FolderLock
from gradwire_server.kv_cache import BlockPool
from gradwire_server.malformed import MalformedRequestGuard
from gradwire_server.memory import MemoryPlan, free_bytes
from gradwire_server.models import LoadedModel, load_model, resolve_dtype
from gradwire_server.operations import OperationsServicer, OperationStore
from gradwire_server.resource_servicer import ResourceServicer
from gradwire_server.run_index import RunIndex
from gradwire_server.sampler import DecodeLoop, resolve_sampler_logprobs
from gradwire_server.sampler_weights import SamplerAdapters
from gradwire_server.sampling_servicer import SamplingServicer
from gradwire_server.scheduler import Scheduler
from gradwire_server.training_servicer import ModelInfo, TrainingServicer

log = logging.getLogger("gradwire_server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default, so any client's defaults work
TRAINING_SERVICE = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
RESOURCE_SERVICE = rpb.DESCRIPTOR.services_by_name["ResourceService"].full_name
DEFAULT_CHECKPOINT_DIR = pathlib.Path("gradwire-checkpoints")
INDEX_FILE = "index.sqlite3"
OUTPUTS_FOLDER = ".operation-outputs"  # a file of per-datum outputs per operation
SAMPLING_SERVICE = sampling_service_pb2.DESCRIPTOR.services_by_name["SamplingService"].full_name
OPERATIONS_SERVICE = operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name
_EXPIRY_INTERVAL_S = 60.0
DEFAULT_CPU_KV_CACHE_MB = 512.0
# Of the memory free after loading the model, when no budget is given; the rest is training's
# (micro-batches, kept graphs). With a 1.1B Llama on an 80 GB card: ~19 GiB, 900k cached tokens.
CUDA_KV_CACHE_SHARE = 0.25


@dataclass
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    checkpoint_dir: pathlib.Path = DEFAULT_CHECKPOINT_DIR
    operation_ttl_s: float = 1800.0
    max_wait_s: float = 30.0
    # How long a run's request waits for a missing lower seq_id before it is aborted.
    seq_gap_timeout_s: float = 60.0
    # Activations custom losses' forward legs may keep for their backward legs
    # (0: always recompute); None: sized from the device's free memory.
    keep_graph_budget_mb: float | None = None
    keep_graph_timeout_s: float = KEEP_GRAPH_TIMEOUT_S
    # Padded tokens per forward pass; None: sized from the device's free memory.
    micro_batch_tokens: int | None = None
    dtype: str = "auto"          # the base weights': auto (bfloat16 on CUDA), float32 or bfloat16
    load_format: str = "auto"    # "dummy": random weights from a config (see models.py)
    # The sampler's KV cache budget; None: DEFAULT_CPU_KV_CACHE_MB on CPU, a share of free memory on CUDA.
    kv_cache_mb: float | None = None
    # Training recomputes each decoder layer in the backward pass instead of keeping its activations.
    activation_checkpointing: bool = False
    # Training runs the decoder layers compiled by torch.compile (compiled_layers.py).
    compile: bool = False
    # On CUDA the sampler's decode steps replay CUDA graphs (decode_graphs.py).
    cuda_graphs: bool = True
    # The attention kernel training and sampling use (attention.py): auto, efficient, math or eager.
    attention: str = "auto"
    # Where the sampler's logprobs come from (sampler.py): auto, training or decode.
    sampler_logprobs: str = "auto"
    # How often checkpoints whose TTL ran out are deleted.
    checkpoint_expiry_interval_s: float = 60.0


class StartupError(Exception):
    """The server cannot start as configured; the message names the flag and why."""


class GradwireServer:
    """One running server. `await start()`, then `await wait_for_termination()` or `await stop()`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.checkpoint_root = pathlib.Path(config.checkpoint_dir)
        self.folder_lock: FolderLock | None = None
        try:
            if self.checkpoint_root.exists() and not self.checkpoint_root.is_dir():
                raise NotADirectoryError("not a folder")
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            self.folder_lock = FolderLock(self.checkpoint_root)  # before anything in the folder is touched
            self.store = OperationStore(self.checkpoint_root / OUTPUTS_FOLDER, config.operation_ttl_s,
                                        config.max_wait_s)
            self.index = RunIndex(self.checkpoint_root / INDEX_FILE)
            # Checkpoint folders are the truth; no run of an earlier process is in memory.
            checkpoints.remove_leftovers(self.checkpoint_root)
            self.index.unload_all()
            self.index.reconcile((saved.record(), saved.run_record())
                                 for saved in checkpoints.scan(self.checkpoint_root))
        except (FolderInUse, OSError, sqlite3.DatabaseError) as error:  # not a folder, not writable, damaged index
            self._release_folder()
            raise StartupError(f"--checkpoint-dir {config.checkpoint_dir}: {error}") from error
        self.training = TrainingServicer(self.store, MAX_MESSAGE_BYTES, self.checkpoint_root, self.index)
        self.resources = ResourceServicer(self.checkpoint_root, self.index)
        self.sampling = SamplingServicer(self.store, self.checkpoint_root)
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.port: int | None = None
        self._expiry: list[asyncio.Task] = []

    async def start(self) -> None:
        # Created here: gRPC's aio objects bind to the running event loop.
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(interceptors=[MalformedRequestGuard()], options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC shares a port between processes by default on Linux: a second server on this
            # port would start, and the kernel would split clients (and their runs) between the two.
            ("grpc.so_reuseport", 0)])
        pb_grpc.add_TrainingServiceServicer_to_server(self.training, self._server)
        rpb_grpc.add_ResourceServiceServicer_to_server(self.resources, self._server)
        sampling_service_pb2_grpc.add_SamplingServiceServicer_to_server(self.sampling, self._server)
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(self.store), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [TRAINING_SERVICE, SAMPLING_SERVICE, RESOURCE_SERVICE, OPERATIONS_SERVICE,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        host, port = self.config.host, self.config.port
        address = listen_address(host, port)
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as error:  # gRPC's log line above it gives the cause
            self._release_folder()
            cause = (f"--host {host}: cannot listen on {address}: not an address of this machine" if port == 0 else
                     f"--port {port}: cannot listen on {address}: in use by another process, or --host {host} "
                     "is not an address of this machine")
            raise StartupError(cause) from error
        await self._server.start()

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.scheduler = Scheduler(self.store, asyncio.get_running_loop(), self.config.seq_gap_timeout_s)
        self.scheduler.start()
        try:
            # On the worker, the thread that runs every later use of the model. On a CPU host each
            # thread that runs a parallel torch op keeps an OpenMP team of its own, and with more
            # teams' threads than cores every small op of the worker waits on the OS (sampling ran
            # at a third of its speed after a probe pass in another thread, 2 cores).
            loaded, plan, adapters, decode_loop = await self.scheduler.run_on_worker(
                "startup", lambda: self._load(device))
        except BaseException:
            await asyncio.to_thread(self.scheduler.stop)  # after the startup work the worker runs, if cancelled
            await self._server.stop(0)
            self._release_folder()
            raise
        log.info("base weights %s on %s; micro-batches of %d tokens, keep-graph budget %.0f MiB "
                 "(%d bytes per token measured)", loaded.dtype, device, plan.micro_batch_tokens,
                 plan.keep_graph_budget_bytes / 2**20, plan.activation_bytes_per_token)
        info = _model_info(loaded, device, plan, self.config.attention, decode_loop.logprobs_from)
        self.training.attach(self.engine, self.scheduler, info, adapters, decode_loop.usage)
        self.sampling.attach(self.engine, self.scheduler, info, adapters, decode_loop)
        self.resources.attach(self.scheduler)
        self._expiry = [asyncio.create_task(self._expire_operations()),
                        asyncio.create_task(self._expire_kept_graphs()),
                        asyncio.create_task(self._expire_checkpoints())]
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("gradwire-server listening on %s", listen_address(self.config.host, self.port))

    def _load(self, device: torch.device) -> tuple[LoadedModel, MemoryPlan, SamplerAdapters, DecodeLoop]:
        """The model, the training engine and its memory plan, and the sampler (on the worker)."""
        config = self.config
        try:
            loaded = load_model(config.model, device, resolve_dtype(config.dtype, device), config.load_format)
        except (OSError, ValueError) as error:  # no such folder, preset or cached hub id; no weights
            raise StartupError(f"--model {config.model}: {error}") from error
        try:
            attention = use_attention(loaded.model, config.attention, loaded.dtype)
        except ValueError as error:
            raise StartupError(f"--attention {config.attention}: {error}") from error
        self.engine = Engine(loaded, device, keep_graph_timeout_s=config.keep_graph_timeout_s,
                             activation_checkpointing=config.activation_checkpointing,
                             compile_layers=config.compile, attention=attention)
        # The KV cache is allocated first, so the training plan sizes itself from what is left.
        kv_cache_bytes = _kv_cache_bytes(config.kv_cache_mb, device)
        try:
            pool = BlockPool(loaded.model.config, kv_cache_bytes, loaded.dtype, device)
        except RuntimeError as error:  # torch.OutOfMemoryError on CUDA, the allocator's RuntimeError on the CPU
            flag = "--kv-cache-mb" + ("" if config.kv_cache_mb is None else f" {config.kv_cache_mb:g}")
            raise StartupError(f"{flag}: cannot allocate the sampler's KV cache, {kv_cache_bytes / 2**20:,.0f} MiB "
                               f"({str(error).splitlines()[0]})") from error
        budget = None if config.keep_graph_budget_mb is None else int(config.keep_graph_budget_mb * 2**20)
        try:  # with --compile both passes compile the decoder layers
            plan = self.engine.plan_memory(config.micro_batch_tokens, budget)
            if config.compile:
                self.engine.warm_up_compiled_layers()
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise StartupError(f"--compile: torch.compile could not build the decoder layers' kernels "
                               f"({str(error).splitlines()[0]}); a missing compiler is the usual cause (inductor "
                               f"needs a C++ compiler on the CPU, triton on CUDA); without --compile training "
                               f"runs eagerly") from error
        adapters = SamplerAdapters(self.engine)
        decode_loop = DecodeLoop(loaded.model, pool, device, adapters.base_weights,
                                 graphs="captured" if device.type == "cuda" and config.cuda_graphs else "off",
                                 logprobs_from=resolve_sampler_logprobs(config.sampler_logprobs, loaded.dtype),
                                 compiled=self.engine.compiled)
        return loaded, plan, adapters, decode_loop

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drains: NOT_SERVING; new requests are refused (UNAVAILABLE); the step the worker
        computes ends, and every request that did not finish fails UNAVAILABLE "not finished",
        which clients long-polling it read; then RPCs in flight have `grace_s` before the port closes."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in self._expiry:
            task.cancel()
        if self.scheduler is not None:
            self.scheduler.refuse_new_work()
            await asyncio.to_thread(self.scheduler.drain)
            self.scheduler.abort_held(stopping())
        await self._server.stop(grace_s)
        self.store.close()
        self.index.close()
        self._release_folder()

    def _release_folder(self) -> None:
        if self.folder_lock is not None:
            self.folder_lock.release()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for service in ("", TRAINING_SERVICE, SAMPLING_SERVICE, RESOURCE_SERVICE):
            await self.health.set(service, status)

    async def _expire_operations(self) -> None:
        while True:  # a short TTL (tests) is checked as often as it lasts
            await asyncio.sleep(min(_EXPIRY_INTERVAL_S, max(self.config.operation_ttl_s, 0.1)))
            self.store.expire()

    async def _expire_checkpoints(self) -> None:
        """Deletes checkpoints whose TTL ran out (on the worker, between saves and loads)."""
        while True:
            await asyncio.sleep(self.config.checkpoint_expiry_interval_s)
            await self.expire_checkpoints()

    async def expire_checkpoints(self) -> list[str]:
        """One sweep now: deletes the checkpoints whose TTL ran out; returns their paths."""
        now = time.time()
        deleted = await self.scheduler.run_on_worker("expire-checkpoints", lambda: checkpoint_ops.delete_expired(
            self.checkpoint_root, self.index, now))
        for path in deleted:
            log.info("deleted expired checkpoint %s", path)
        return deleted

    async def _expire_kept_graphs(self) -> None:
        """Frees forward graphs whose backward leg never came (the client went away)."""
        while True:
            await asyncio.sleep(self.config.keep_graph_timeout_s / 4)
            await self.scheduler.run_on_worker("expire-graphs", self.engine.drop_expired_graphs)


def listen_address(host: str, port: int) -> str:
    """host:port as gRPC takes it: an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _kv_cache_bytes(budget_mb: float | None, device: torch.device) -> int:
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    if device.type == "cuda":
        return int(free_bytes(device) * CUDA_KV_CACHE_SHARE)
    return int(DEFAULT_CPU_KV_CACHE_MB * 2**20)


def _model_info(loaded: LoadedModel, device: torch.device, plan: MemoryPlan, attention: str,
                sampler_logprobs: str) -> ModelInfo:
    with tempfile.TemporaryDirectory() as folder:
        loaded.tokenizer.save_pretrained(folder)
        files = {path.name: path.read_bytes() for path in pathlib.Path(folder).iterdir() if path.is_file()}
    return ModelInfo(name=loaded.name, architecture=type(loaded.model).__name__,
                     vocab_size=loaded.vocab_size, max_context_length=loaded.max_context_length,
                     device=device.type, tokenizer_files=files, aliases=loaded.aliases,
                     dtype=str(loaded.dtype).removeprefix("torch."), memory=plan, attention=attention,
                     sampler_logprobs=sampler_logprobs)


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then drains and stops; a second signal ends the
    process at once (a load or a job in progress can take minutes; checkpoints are
    written atomically, so none is left half-written)."""
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # os._exit: SystemExit would wait for the worker's load or job
            print("gradwire-server: a second signal: exiting without draining", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await serve_until(config, stop)


async def serve_until(config: ServerConfig, stop: asyncio.Event) -> None:
    """Serves until `stop` is set, then drains and stops. Set while the model loads, the
    server never reports SERVING: it stops once the load (which cannot be interrupted) ends."""
    server = GradwireServer(config)
    starting, stopping = asyncio.ensure_future(server.start()), asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("gradwire-server stopping before it serves; the model's load ends first")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    starting.result()  # a StartupError ends serve here
    await stopping
    log.info("gradwire-server stopping")
    await server.stop()


class BackgroundServer:
    """A server on its own event loop in a daemon thread, for embedding it in a
    Python process (notebooks, tests). `address` is "host:port"."""

    def __init__(self, config: ServerConfig):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gradwire-server",
                                        daemon=True)
        self._thread.start()
        self.server = GradwireServer(config)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        self.address = f"{config.host}:{self.server.port}"

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def call(self, fn, *args):
        """Runs fn(*args) on the worker thread (the device owner) and returns its result."""
        async def run():
            return await self.server.scheduler.run_on_worker("call", lambda: fn(*args))
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def expire_checkpoints(self) -> list[str]:
        """Runs one sweep of expired checkpoints now; returns the paths deleted."""
        return asyncio.run_coroutine_threadsafe(self.server.expire_checkpoints(), self._loop).result()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s=1.0), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
