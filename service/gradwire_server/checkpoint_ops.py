"""Checkpoint work: the engine's run state, checkpoint folders and the run index
together. Everything here but `loadable` runs on the worker thread; no gRPC
here: the servicers validate requests and submit these to the scheduler."""
from __future__ import annotations

import pathlib
import shutil
import time

import grpc

from gradwire_server import checkpoints
from gradwire_server.engine import Engine
from gradwire_server.errors import FieldViolation, ServiceError, failed_precondition, invalid_argument
from gradwire_server.run_index import CheckpointRecord, RunIndex, record_change


class CheckpointOps:
    """Saves, loads and unloads the runs of one engine (one base model)."""

    def __init__(self, engine: Engine, root: pathlib.Path, index: RunIndex, base_model: str):
        self.engine = engine
        self.root = root
        self.index = index
        self.base_model = base_model

    def loadable(self, path: str, optimizer: bool) -> checkpoints.Checkpoint:
        """The checkpoint at `path`, if it exists and can be loaded here as asked
        (also checked at admission: it only reads files)."""
        checkpoint = checkpoints.find(self.root, path)
        if optimizer and checkpoint.path.kind != "weights":
            raise invalid_argument([FieldViolation(
                "path", f"{path} is a sampler checkpoint and holds no optimizer state: load it "
                        "without the optimizer, or pass a gradwire://<run_id>/weights/<name> path")])
        checkpoints.check_base_model(checkpoint, self.base_model)
        return checkpoint

    def save(self, path: checkpoints.CheckpointPath, ttl_seconds: int | None = None, overwrite: bool = False,
             user_metadata: dict[str, str] | None = None) -> None:
        """Writes the run's state as the checkpoint at `path` (weights/: with the optimizer);
        see checkpoints.write for the TTL and overwrite."""
        state = self.engine.save_state(path.run_id, with_optimizer=path.kind == "weights")
        try:
            saved = checkpoints.write(self.root, path, state, self.base_model, ttl_seconds, overwrite,
                                      user_metadata)
        except OSError as error:  # the disk's state (full, read-only, ...), not a bug: fixed by whoever runs the server
            raise failed_precondition(f"checkpoint {path.path} was not written: {error} (the server's "
                                      "--checkpoint-dir must be a writable folder with room)",
                                      "CHECKPOINT_NOT_WRITTEN") from error
        record_change(f"checkpoint {path.path}", self.index.add_checkpoint, saved.record())

    def load(self, run_id: str, path: str, optimizer: bool) -> None:
        """Replaces the run's weights (and optimizer state) with the checkpoint's."""
        step = self._load_into(run_id, path, optimizer)
        record_change(f"the step of {run_id}", self.index.set_step, run_id, step)

    def create_from_state(self, path: str, optimizer: bool, user_metadata: dict[str, str]) -> str:
        """A new run with the checkpoint's LoRA settings and state; returns its id.
        If the checkpoint cannot be loaded, no run is left behind."""
        checkpoint = self.loadable(path, optimizer)
        run_id = self.engine.create_run(checkpoint.lora)
        try:
            step = self._load_into(run_id, path, optimizer)
        except BaseException:
            self.engine.unload(run_id)
            raise
        record_change(f"new run {run_id}", self.index.add_run, run_id, self.base_model, checkpoint.lora,
                      user_metadata, step, path)
        return run_id

    def unload(self, run_id: str) -> None:
        """Removes the run from memory; it stays listed, as not loaded."""
        self.engine.unload(run_id)
        record_change(f"unloading {run_id}", self.index.set_unloaded, run_id)

    def _load_into(self, run_id: str, path: str, optimizer: bool) -> int:
        """Loads the checkpoint into the run (checked again: it may have been deleted
        since admission); returns the step it was saved at."""
        checkpoint = self.loadable(path, optimizer)
        adapter, optimizer_state = checkpoints.read(checkpoint, optimizer)
        try:
            self.engine.load_state(run_id, adapter, optimizer_state, checkpoint.step)
        except ValueError as error:
            raise failed_precondition(f"checkpoint {path} does not fit training run {run_id}: {error}",
                                      "CHECKPOINT_MISMATCH") from None
        return checkpoint.step


def set_ttl(root: pathlib.Path, index: RunIndex, path: str, ttl_seconds: int | None) -> CheckpointRecord:
    """Gives the checkpoint at `path` a TTL from now (None: none) on disk and in the index
    (worker side, between saves and deletions); returns its index row."""
    checkpoint = checkpoints.find(root, path)
    expires = None if ttl_seconds is None else time.time() + ttl_seconds
    updated = checkpoints.set_expiry(checkpoint, expires)
    record_change(f"the TTL of {path}", index.set_checkpoint_expiry, path, expires)
    return index.get_checkpoint(path) or updated.record()


def delete_expired(root: pathlib.Path, index: RunIndex, now: float) -> list[str]:
    """Deletes every checkpoint whose TTL ran out by `now` (worker side); returns their paths."""
    deleted = []
    for path in index.expired_checkpoints(now):
        try:
            checkpoints.delete(checkpoints.find(root, path, include_expired=True))
        except ServiceError:  # gone already (or unreadable): its row goes anyway
            pass
        record_change(f"deletion of {path}", index.remove_checkpoint, path)
        deleted.append(path)
    return deleted


def delete(root: pathlib.Path, index: RunIndex, path: str) -> None:
    """Deletes the checkpoint at `path` and its index row (worker side, so it never races
    a save, a load or another delete): NOT_FOUND if it is gone already. An expired one not yet
    swept goes too, and so does a listed one that find() no longer gives (its marker removed or
    damaged by hand, its folder removed): what is left of its folder goes with its row, so the
    listing can be cleaned."""
    try:
        checkpoints.delete(checkpoints.find(root, path, include_expired=True))
    except ServiceError as error:
        gone = error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS)
        if not gone or index.get_checkpoint(path) is None:
            raise
        shutil.rmtree(checkpoints.parse_path(path).folder(root), ignore_errors=True)
    record_change(f"deletion of {path}", index.remove_checkpoint, path)
