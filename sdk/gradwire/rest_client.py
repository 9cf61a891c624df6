"""RestClient: training runs and checkpoints as resources (gradwire.v1.ResourceService).

Named after Tinker's RestClient; it speaks gRPC like the rest of the SDK.
"""
from __future__ import annotations

import asyncio
import numbers
import os
import pathlib
import secrets
import shutil
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from gradwire import _convert, types
from gradwire.errors import APIError, UnsupportedFeatureError
from gradwire.futures import APIFuture
from gradwire.v1 import resource_service_pb2 as rpb

T = TypeVar("T")

if TYPE_CHECKING:
    from gradwire.client import ServiceClient


class RestClient:
    """Training runs and checkpoints as resources, with Tinker's RestClient methods.

    Create it with `ServiceClient.create_rest_client()`. As in Tinker, each method
    returns a future at once (`.result()`), and its `_async` twin the value.
    Checkpoint paths may be written gradwire://... or tinker://... Sharing across
    accounts (access_scope other than "owned"), projects, sessions, publishing, audit
    logs, billing and signed archive URLs raise UnsupportedFeatureError (see
    _UNSUPPORTED); download_checkpoint fetches a checkpoint's files instead.
    """

    def __init__(self, service: ServiceClient):
        self.service = service

    def _call(self, method: str, request):
        return self.service._call(method, request, stub=self.service._transport.resources)

    def _background(self, fn: Callable[[], T]) -> APIFuture[T]:
        running = self.service._in_background(fn)
        return APIFuture(running.result, running)

    # ---- training runs -------------------------------------------------------------------

    def get_training_run(self, training_run_id: str, access_scope: str = "owned"
                         ) -> APIFuture[types.TrainingRun]:
        """One training run (NotFoundError if the server never had it)."""
        _check_scope(access_scope)
        return self._background(lambda: self._training_run(training_run_id))

    def get_training_run_by_tinker_path(self, tinker_path: str, access_scope: str = "owned"
                                        ) -> APIFuture[types.TrainingRun]:
        """The training run that saved the checkpoint at `tinker_path`."""
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self.get_training_run(parsed.training_run_id, access_scope)

    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: str = "owned",
                           project_id: str | None = None) -> APIFuture[types.TrainingRunsResponse]:
        """Training runs, oldest first, loaded in memory or not: `limit` from `offset`."""
        _check_scope(access_scope)
        if project_id is not None:
            raise UnsupportedFeatureError("list_training_runs(project_id=...)", _HOSTED)
        return self._page(self._all_training_runs, limit, offset, types.TrainingRunsResponse)

    # ---- checkpoints ---------------------------------------------------------------------

    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        """The run's checkpoints, oldest first (expired ones are gone)."""
        return self._background(lambda: types.CheckpointsListResponse(self._checkpoints(training_run_id)))

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0
                              ) -> APIFuture[types.CheckpointsListResponse]:
        """Checkpoints of every run on the server, newest first: `limit` from `offset`."""
        return self._page(self._all_checkpoints_newest_first, limit, offset, types.CheckpointsListResponse)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str | None = None) -> APIFuture[None]:
        """Deletes the run's checkpoint `checkpoint_id` ("weights/<name>" or
        "sampler_weights/<name>") from the server's disk. (gradwire's former form,
        delete_checkpoint(path), is deprecated.)"""
        if checkpoint_id is None:
            warnings.warn("delete_checkpoint(path) is deprecated: use delete_checkpoint(training_run_id, "
                          "checkpoint_id) or delete_checkpoint_from_tinker_path(path)",
                          DeprecationWarning, stacklevel=2)
            return self.delete_checkpoint_from_tinker_path(training_run_id)
        path = f"gradwire://{training_run_id}/{checkpoint_id}"
        return self._background(lambda: self._delete(path))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Deletes the checkpoint at `tinker_path` (gradwire://... or tinker://...)."""
        path = _convert.gradwire_path(tinker_path)
        return self._background(lambda: self._delete(path))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        """Sets the checkpoint's TTL to ttl_seconds from now (the server then deletes it),
        or with None removes it (kept until deleted)."""
        request = _convert.message(rpb.SetCheckpointTtlRequest, path=_convert.gradwire_path(tinker_path),
                                   ttl_seconds=ttl_seconds)
        return self._background(lambda: self._call("SetCheckpointTtl", request) and None)

    def download_checkpoint(self, path: str, dest_dir: str | os.PathLike) -> pathlib.Path:
        """Writes the checkpoint's files into `dest_dir` (created; must be absent or
        empty) and returns it. The files appear only once all are complete (an absent
        folder appears whole): for a peft adapter, PeftModel.from_pretrained(base_model,
        dest_dir) loads it."""
        path = _convert.gradwire_path(path)
        dest = pathlib.Path(dest_dir)
        if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
            raise ValueError(f"dest_dir {str(dest)!r} must be absent or an empty folder: nothing was downloaded")
        absolute = pathlib.Path(os.path.abspath(dest))  # "." or "..": no name to put the partial folder beside
        absolute.parent.mkdir(parents=True, exist_ok=True)
        partial = absolute.parent / f".{absolute.name}.partial-{secrets.token_hex(4)}"
        transport = self.service._transport

        def download() -> tuple[dict[str, int], dict[str, int]]:  # from the start on every try
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            written: dict[str, int] = {}
            announced: dict[str, int] = {}
            for chunk in transport.resources.DownloadCheckpoint(rpb.DownloadCheckpointRequest(path=path),
                                                                metadata=transport.metadata):
                _write_chunk(partial, chunk, written)
                announced[chunk.relative_path] = chunk.file_size
            return written, announced

        try:
            written, announced = transport.retrying(download)
            short = {name: size for name, size in written.items() if size != announced[name]}
            if short or not written:
                raise APIError(f"download of {path} is incomplete: {short or 'no file'}")
            _move_into_place(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return dest

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        """Models, built-in losses, limits and device of the server."""
        return self._background(self.service.get_server_capabilities)

    def get_telemetry(self) -> None:
        """None: gradwire's SDK collects no telemetry."""
        return None

    # ---- async twins (values) ----------------------------------------------------------------

    async def get_training_run_async(self, training_run_id: str, access_scope: str = "owned") -> types.TrainingRun:
        return await self.get_training_run(training_run_id, access_scope)

    async def get_training_run_by_tinker_path_async(self, tinker_path: str, access_scope: str = "owned"
                                                    ) -> types.TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0, access_scope: str = "owned",
                                       project_id: str | None = None) -> types.TrainingRunsResponse:
        return await self.list_training_runs(limit, offset, access_scope, project_id)

    async def list_checkpoints_async(self, training_run_id: str) -> types.CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0
                                          ) -> types.CheckpointsListResponse:
        return await self.list_user_checkpoints(limit, offset)

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        await self.delete_checkpoint(training_run_id, checkpoint_id)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self.delete_checkpoint_from_tinker_path(tinker_path)

    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        await self.set_checkpoint_ttl_from_tinker_path(tinker_path, ttl_seconds)

    async def download_checkpoint_async(self, path: str, dest_dir: str | os.PathLike) -> pathlib.Path:
        return await asyncio.to_thread(self.download_checkpoint, path, dest_dir)

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await self.get_server_capabilities()

    # ---- plumbing ----------------------------------------------------------------------------

    def _page(self, fetch_all: Callable[[], list], limit: int, offset: int,
              response_type: Callable[[list, types.Cursor], T]) -> APIFuture[T]:
        """`limit` items from `offset` of what fetch_all returns, with the cursor that places
        them in the whole. The listing is fetched whole (every page) and the window cut here."""
        for name, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

        def page() -> T:
            everything = fetch_all()
            return response_type(everything[offset:offset + limit], types.Cursor(offset, limit, len(everything)))

        return self._background(page)

    def _training_run(self, training_run_id: str) -> types.TrainingRun:
        return _convert.training_run(
            self._call("GetTrainingRun", rpb.GetTrainingRunRequest(training_run_id=training_run_id)))

    def _all_training_runs(self) -> list[types.TrainingRun]:
        return [_convert.training_run(run)
                for run in self._every_page("ListTrainingRuns", rpb.ListTrainingRunsRequest(), "training_runs")]

    def _checkpoints(self, training_run_id: str) -> list[types.Checkpoint]:
        request = rpb.ListCheckpointsRequest(training_run_id=training_run_id)
        return [_convert.checkpoint(c) for c in self._every_page("ListCheckpoints", request, "checkpoints")]

    def _all_checkpoints_newest_first(self) -> list[types.Checkpoint]:
        return sorted((c for run in self._all_training_runs() for c in self._checkpoints(run.training_run_id)),
                      key=lambda c: c.time, reverse=True)

    def _every_page(self, method: str, request: Message, items_field: str) -> list[Message]:
        """The `items_field` entries of every page of a listing: `method` is called again
        with each next_page_token until a page comes without one. Sets request.page_token."""
        items: list[Message] = []
        while True:
            response = self._call(method, request)
            items.extend(getattr(response, items_field))
            if not response.next_page_token:
                return items
            request.page_token = response.next_page_token

    def _delete(self, path: str) -> None:
        self._call("DeleteCheckpoint", rpb.DeleteCheckpointRequest(path=path))


_HOSTED = "it is a feature of the hosted Tinker service"
_NO_ARCHIVE_URLS = ("signed archive URLs are the hosted service's storage; "
                    "RestClient.download_checkpoint(path, dest_dir) fetches the files")
# Tinker's RestClient methods a self-hosted gradwire server does not offer (each with an
# _async twin): calling one raises UnsupportedFeatureError naming it and why.
_UNSUPPORTED = {
    "get_checkpoint_archive_url": _NO_ARCHIVE_URLS,
    "get_checkpoint_archive_url_from_tinker_path": _NO_ARCHIVE_URLS,
    "get_external_weights_urls": _NO_ARCHIVE_URLS,
    "get_weights_info_by_tinker_path": "not implemented by gradwire yet; get_training_run_by_tinker_path "
                                       "describes the run",
    "publish_checkpoint_from_tinker_path": "publishing checkpoints is a feature of the hosted Tinker service",
    "unpublish_checkpoint_from_tinker_path": "publishing checkpoints is a feature of the hosted Tinker service",
    "copy_weights": "copying weights between projects is a feature of the hosted Tinker service",
    "get_audit_log": _HOSTED, "get_billing_usage": _HOSTED, "get_current_checkpoint_storage_usage": _HOSTED,
    "get_session": _HOSTED, "list_sessions": _HOSTED, "assign_session_project": _HOSTED,
    "export_session_trace": _HOSTED, "search_sessions": _HOSTED, "get_sampler": _HOSTED, "whoami": _HOSTED,
}


def _unsupported(name: str, why: str, is_async: bool) -> Callable:
    def method(self, *args, **kwargs):
        raise UnsupportedFeatureError(f"RestClient.{name}", why)

    async def async_method(self, *args, **kwargs):
        method(self)

    chosen = async_method if is_async else method
    chosen.__name__ = chosen.__qualname__ = name + ("_async" if is_async else "")
    chosen.__doc__ = f"Not supported: raises UnsupportedFeatureError ({why})."
    return chosen


for _name, _why in _UNSUPPORTED.items():
    setattr(RestClient, _name, _unsupported(_name, _why, False))
    setattr(RestClient, _name + "_async", _unsupported(_name, _why, True))


def _check_scope(access_scope: str) -> None:
    if access_scope != "owned":
        raise UnsupportedFeatureError(f"access_scope={access_scope!r}",
                                      "runs shared across accounts are a feature of the hosted Tinker service")


def _move_into_place(partial: pathlib.Path, dest: pathlib.Path) -> None:
    """The complete download becomes `dest`: renamed whole where dest is absent; moved in file
    by file where it is an empty folder, which renaming over would unlink (as "." it is the
    caller's working directory)."""
    if not dest.exists():
        os.replace(partial, dest)
        return
    for file in partial.iterdir():
        os.replace(file, dest / file.name)
    partial.rmdir()


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
