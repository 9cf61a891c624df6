"""gradwire.v1.ResourceService: training runs and checkpoints as resources,
read from the run index; downloads stream the checkpoint's files."""
from __future__ import annotations

import asyncio
import pathlib

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server import checkpoints
from gradwire_server.errors import FieldViolation, ServiceError, abort, invalid_argument, not_found
from gradwire_server.run_index import CheckpointRecord, RunIndex, RunRecord
from gradwire_server.scheduler import Scheduler

DOWNLOAD_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class ResourceServicer(rpb_grpc.ResourceServiceServicer):
    def __init__(self, checkpoint_root: pathlib.Path, index: RunIndex):
        self.checkpoint_root = checkpoint_root
        self.index = index
        self.scheduler: Scheduler | None = None

    def attach(self, scheduler: Scheduler) -> None:
        """Deletions run on the worker, in between saves and loads; until then UNAVAILABLE."""
        self.scheduler = scheduler

    async def ListTrainingRuns(self, request, context):
        try:
            offset = _page_offset(request.page_token)
            if not 0 <= request.page_size <= MAX_PAGE_SIZE:
                raise invalid_argument([FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}]")])
        except ServiceError as error:
            await abort(context, error)
        size = request.page_size or DEFAULT_PAGE_SIZE
        runs = self.index.list_runs(offset, size + 1)
        response = rpb.ListTrainingRunsResponse(training_runs=[self._run(r) for r in runs[:size]])
        if len(runs) > size:
            response.next_page_token = str(offset + size)
        return response

    async def GetTrainingRun(self, request, context):
        run = self.index.get_run(request.training_run_id)
        if run is None:
            await abort(context, not_found("training run", request.training_run_id))
        return self._run(run)

    async def ListCheckpoints(self, request, context):
        if self.index.get_run(request.training_run_id) is None:
            await abort(context, not_found("training run", request.training_run_id))
        return rpb.ListCheckpointsResponse(
            checkpoints=[_checkpoint(c) for c in self.index.list_checkpoints(request.training_run_id)])

    async def DeleteCheckpoint(self, request, context):
        try:
            if self.scheduler is None:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading", "LOADING")
            checkpoint = checkpoints.find(self.checkpoint_root, request.path)

            def delete() -> None:
                checkpoints.delete(checkpoint)
                self.index.remove_checkpoint(checkpoint.path.path)

            await self.scheduler.run_on_worker("delete_checkpoint", delete)
            return empty_pb2.Empty()
        except ServiceError as error:
            await abort(context, error)

    async def DownloadCheckpoint(self, request, context):
        try:
            checkpoint = checkpoints.find(self.checkpoint_root, request.path)
        except ServiceError as error:
            await abort(context, error)
        try:
            for file in checkpoints.files(checkpoint):
                size = file.stat().st_size
                with open(file, "rb") as handle:
                    offset = 0
                    while True:
                        data = await asyncio.to_thread(handle.read, DOWNLOAD_CHUNK_BYTES)
                        if offset and not data:
                            break
                        yield rpb.CheckpointChunk(relative_path=file.name, offset=offset, data=data,
                                                  file_size=size)
                        offset += len(data)
                        if len(data) < DOWNLOAD_CHUNK_BYTES:  # an empty file still gets one chunk
                            break
        except FileNotFoundError:  # deleted while streaming
            await abort(context, not_found("checkpoint", request.path))

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
    return rpb.Checkpoint(checkpoint_id=record.checkpoint_id, checkpoint_type=record.checkpoint_type,
                          time=_timestamp(record.created_time), path=record.path,
                          size_bytes=record.size_bytes, training_run_id=record.run_id)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _page_offset(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise invalid_argument([FieldViolation("page_token", f"{token!r} is not a page token of this server")])
    return int(token)
