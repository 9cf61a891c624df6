"""gradwire.v1.ResourceService: training runs and checkpoints as resources,
read from the run index; downloads stream the checkpoint's files. Index
queries and file reads run in helper threads (asyncio.to_thread), deletions
on the worker: the event loop never blocks on the disk."""
from __future__ import annotations

import asyncio
import os
import pathlib

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server import checkpoint_ops, checkpoints, paging, validation
from gradwire_server.errors import ServiceError, abort, not_found
from gradwire_server.run_index import CheckpointRecord, RunIndex, RunRecord
from gradwire_server.scheduler import Scheduler

DOWNLOAD_CHUNK_BYTES = 2 * 1024 * 1024


class ResourceServicer(rpb_grpc.ResourceServiceServicer):
    def __init__(self, checkpoint_root: pathlib.Path, index: RunIndex):
        self.checkpoint_root = checkpoint_root
        self.index = index
        self.scheduler: Scheduler | None = None

    def attach(self, scheduler: Scheduler) -> None:
        """Deletions run on the worker, in between saves and loads; until then UNAVAILABLE."""
        self.scheduler = scheduler

    async def ListTrainingRuns(self, request, context):
        def page() -> rpb.ListTrainingRunsResponse:
            after, size = paging.page(request.page_token, request.page_size, "training runs")
            runs = self.index.list_runs(after, size + 1)
            listed = [self._run(r) for r in runs[:size]]
            size = paging.fitting(listed)  # user_metadata can make runs large
            last = [runs[size - 1].created_time, runs[size - 1].run_id] if len(runs) > size else None
            return rpb.ListTrainingRunsResponse(training_runs=listed[:size],
                                                next_page_token=paging.next_token("training runs", last, bool(last)))

        try:
            return await asyncio.to_thread(page)
        except ServiceError as error:
            await abort(context, error)

    async def GetTrainingRun(self, request, context):
        def get() -> rpb.TrainingRun:
            run = self.index.get_run(request.training_run_id)
            if run is None:
                raise not_found("training run", request.training_run_id)
            return self._run(run)

        try:
            return await asyncio.to_thread(get)
        except ServiceError as error:
            await abort(context, error)

    async def ListCheckpoints(self, request, context):
        def page() -> rpb.ListCheckpointsResponse:
            listing = f"checkpoints of {request.training_run_id}"
            after, size = paging.page(request.page_token, request.page_size, listing)
            if self.index.get_run(request.training_run_id) is None:
                raise not_found("training run", request.training_run_id)
            saved = self.index.list_checkpoints(request.training_run_id, after, size + 1)
            last = [saved[size - 1].created_time, saved[size - 1].path] if len(saved) > size else None
            return rpb.ListCheckpointsResponse(checkpoints=[_checkpoint(c) for c in saved[:size]],
                                               next_page_token=paging.next_token(listing, last, bool(last)))

        try:
            return await asyncio.to_thread(page)
        except ServiceError as error:
            await abort(context, error)

    async def DeleteCheckpoint(self, request, context):
        try:
            if self.scheduler is None:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading", "LOADING")
            checkpoints.parse_path(request.path)
            await self.scheduler.run_on_worker("delete_checkpoint", lambda: checkpoint_ops.delete(
                self.checkpoint_root, self.index, request.path))
            return empty_pb2.Empty()
        except ServiceError as error:
            await abort(context, error)

    async def SetCheckpointTtl(self, request, context):
        try:
            if self.scheduler is None:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading", "LOADING")
            checkpoints.parse_path(request.path)
            ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
            validation.ttl_seconds(ttl)
            record = await self.scheduler.run_on_worker("set_checkpoint_ttl", lambda: checkpoint_ops.set_ttl(
                self.checkpoint_root, self.index, request.path, ttl))
            return _checkpoint(record)
        except ServiceError as error:
            await abort(context, error)

    async def DownloadCheckpoint(self, request, context):
        try:
            checkpoint = await asyncio.to_thread(checkpoints.find, self.checkpoint_root, request.path)
            # Checked before a byte is sent (DATA_LOSS, as a load would fail): a damaged copy is
            # never handed out.
            opened = await asyncio.to_thread(checkpoints.open_for_download, checkpoint)
        except ServiceError as error:
            await abort(context, error)
        try:
            for name, handle in opened:
                size = os.fstat(handle.fileno()).st_size
                offset = 0
                while True:
                    data = await asyncio.to_thread(handle.read, DOWNLOAD_CHUNK_BYTES)
                    if offset and not data:
                        break
                    yield rpb.CheckpointChunk(relative_path=name, offset=offset, data=data, file_size=size)
                    offset += len(data)
                    if len(data) < DOWNLOAD_CHUNK_BYTES:  # an empty file still gets one chunk
                        break
        finally:
            for _, handle in opened:
                handle.close()

    def _run(self, run: RunRecord) -> rpb.TrainingRun:
        lora = run.lora
        message = rpb.TrainingRun(
            training_run_id=run.run_id, base_model=run.base_model, is_lora=True, lora_rank=lora.rank,
            lora_config=pb.LoraConfig(rank=lora.rank, seed=lora.seed, train_unembed=lora.train_unembed,
                                      train_mlp=lora.train_mlp, train_attn=lora.train_attn),
            user_metadata=run.user_metadata, create_time=_timestamp(run.created_time),
            last_request_time=_timestamp(run.last_request_time), step=run.last_step,
            loaded=run.loaded, source_checkpoint=run.source_checkpoint or "")
        for saved in self.index.list_checkpoints(run.run_id):  # oldest first: the last one wins
            latest = message.last_checkpoint if saved.checkpoint_type == "training" \
                else message.last_sampler_checkpoint
            latest.CopyFrom(_checkpoint(saved))
        return message


def _checkpoint(record: CheckpointRecord) -> rpb.Checkpoint:
    message = rpb.Checkpoint(checkpoint_id=record.checkpoint_id, checkpoint_type=record.checkpoint_type,
                             time=_timestamp(record.created_time), path=record.path,
                             size_bytes=record.size_bytes, training_run_id=record.run_id)
    if record.expires_time is not None:
        message.expires_at.CopyFrom(_timestamp(record.expires_time))
    return message


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
