"""RestClient: training runs and checkpoints as resources (gradwire.v1.ResourceService).

Named after Tinker's RestClient; it speaks gRPC like the rest of the SDK.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
import shutil
from typing import TYPE_CHECKING

import grpc

from gradwire import _convert, types
from gradwire.errors import APIError, error_from_rpc
from gradwire.v1 import resource_service_pb2 as rpb

if TYPE_CHECKING:
    from gradwire.client import ServiceClient


class RestClient:
    """Lists, describes, deletes and downloads training runs and checkpoints.

    Create it with `ServiceClient.create_rest_client()`. Each method returns its
    value; the `_async` twins await it without blocking the event loop.
    """

    def __init__(self, service: ServiceClient):
        self.service = service

    def _call(self, method: str, request):
        return self.service._call(method, request, stub=self.service._transport.resources)

    def list_training_runs(self) -> list[types.TrainingRun]:
        """Every training run the server knows, oldest first, loaded in memory or not."""
        runs, token = [], ""
        while True:
            response = self._call("ListTrainingRuns", rpb.ListTrainingRunsRequest(page_token=token))
            runs.extend(_convert.training_run(run) for run in response.training_runs)
            token = response.next_page_token
            if not token:
                return runs

    def get_training_run(self, run_id: str) -> types.TrainingRun:
        """One training run (NotFoundError if the server never had it)."""
        return _convert.training_run(
            self._call("GetTrainingRun", rpb.GetTrainingRunRequest(training_run_id=run_id)))

    def list_checkpoints(self, run_id: str) -> list[types.Checkpoint]:
        """The run's checkpoints, oldest first."""
        saved, token = [], ""
        while True:
            response = self._call("ListCheckpoints", rpb.ListCheckpointsRequest(training_run_id=run_id,
                                                                               page_token=token))
            saved.extend(_convert.checkpoint(c) for c in response.checkpoints)
            token = response.next_page_token
            if not token:
                return saved

    def delete_checkpoint(self, path: str) -> None:
        """Deletes the checkpoint at `path` (gradwire://...) from the server's disk."""
        self._call("DeleteCheckpoint", rpb.DeleteCheckpointRequest(path=path))

    def download_checkpoint(self, path: str, dest_dir: str | os.PathLike) -> pathlib.Path:
        """Writes the checkpoint's files into `dest_dir` (created; must be absent or
        empty) and returns it. The folder appears only once complete: for a peft
        adapter, PeftModel.from_pretrained(base_model, dest_dir) loads it."""
        dest = pathlib.Path(dest_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
        partial.mkdir()
        try:
            written: dict[str, int] = {}
            announced: dict[str, int] = {}
            try:
                transport = self.service._transport
                for chunk in transport.resources.DownloadCheckpoint(
                        rpb.DownloadCheckpointRequest(path=path), metadata=transport.metadata):
                    _write_chunk(partial, chunk, written)
                    announced[chunk.relative_path] = chunk.file_size
            except grpc.RpcError as error:
                raise error_from_rpc(error) from None
            short = {name: size for name, size in written.items() if size != announced[name]}
            if short or not written:
                raise APIError(f"download of {path} is incomplete: {short or 'no file'}")
            os.replace(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return dest

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """Models, built-in losses, limits and device of the server."""
        return self.service.get_server_capabilities()

    async def list_training_runs_async(self) -> list[types.TrainingRun]:
        return await asyncio.to_thread(self.list_training_runs)

    async def get_training_run_async(self, run_id: str) -> types.TrainingRun:
        return await asyncio.to_thread(self.get_training_run, run_id)

    async def list_checkpoints_async(self, run_id: str) -> list[types.Checkpoint]:
        return await asyncio.to_thread(self.list_checkpoints, run_id)

    async def delete_checkpoint_async(self, path: str) -> None:
        await asyncio.to_thread(self.delete_checkpoint, path)

    async def download_checkpoint_async(self, path: str, dest_dir: str | os.PathLike) -> pathlib.Path:
        return await asyncio.to_thread(self.download_checkpoint, path, dest_dir)

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await asyncio.to_thread(self.get_server_capabilities)


def _write_chunk(folder: pathlib.Path, chunk: rpb.CheckpointChunk, written: dict[str, int]) -> None:
    """Appends one chunk to its file; chunks of a file must arrive in order."""
    name = chunk.relative_path
    if not name or name != pathlib.PurePosixPath(name).name or name.startswith("."):
        raise APIError(f"download: the server sent an unsafe file name {name!r}")
    offset = written.get(name, 0)
    if chunk.offset != offset:
        raise APIError(f"download: chunk of {name} at offset {chunk.offset}, expected {offset}")
    with open(folder / name, "ab") as out:
        out.write(chunk.data)
    written[name] = offset + len(chunk.data)
    if written[name] > chunk.file_size:
        raise APIError(f"download: {name} is longer than its announced {chunk.file_size} bytes")
