"""Bad checkpoint paths and names, damaged checkpoint files: a clear error, and the
run keeps its weights, gradients and optimizer state exactly."""
from __future__ import annotations

import hashlib
import json
import uuid

import grpc
import pytest
import torch

import gradwire
from gradwire_server import checkpoints
from gradwire_server.errors import ServiceError
from google.longrunning import operations_pb2

from gradwire.v1 import training_service_pb2 as pb
from reference import (assert_optimizer_equal, assert_state_equal, checkpoint_files, finished, new_run,
                       optimizer_state, random_data, raw_request, run_state, trained_run, worker_busy)


def donor_checkpoint(server, service, kind: str = "weights", rank: int = 4):
    """(path, folder) of a fresh checkpoint of another run: loading it would change the run."""
    donor = trained_run(service, rank=rank, seed=5)
    name = uuid.uuid4().hex[:8]
    future = donor.save_state(name) if kind == "weights" else donor.save_weights_for_sampler(name)
    path = future.result().path
    return path, checkpoints.checkpoint_directory(server.server.checkpoint_root, path)


def truncated(file_name: str):
    def damage(server, service):
        path, folder = donor_checkpoint(server, service)
        data = (folder / file_name).read_bytes()
        (folder / file_name).write_bytes(data[: len(data) // 2])
        return path
    return damage


def flipped_byte(server, service):
    path, folder = donor_checkpoint(server, service)
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    return path


def undecodable(server, service):
    """Garbage whose size and sha256 the marker vouches for: the decoder must catch it."""
    path, folder = donor_checkpoint(server, service)
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    marker = json.loads((folder / checkpoints.MARKER).read_text())
    marker["files"]["adapter_model.safetensors"] = {"size": 22, "sha256": hashlib.sha256(
        b"not a safetensors file").hexdigest()}
    (folder / checkpoints.MARKER).write_text(json.dumps(marker))
    return path


def optimizer_edited(edit):
    """A checkpoint whose optimizer.pt holds `edit(AdamW state_dict)`, vouched for by its marker."""
    def make(server, service):
        path, folder = donor_checkpoint(server, service)
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        edit(state)
        torch.save(state, folder / "optimizer.pt")
        data = (folder / "optimizer.pt").read_bytes()
        marker = json.loads((folder / checkpoints.MARKER).read_text())
        marker["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / checkpoints.MARKER).write_text(json.dumps(marker))
        return path
    return make


def other_base_model(server, service):
    path, folder = donor_checkpoint(server, service)
    marker = json.loads((folder / checkpoints.MARKER).read_text())
    marker["base_model"] = "some-other-model"
    (folder / checkpoints.MARKER).write_text(json.dumps(marker))
    return path


# (case, makes the path, with optimizer, error class, gRPC code, words in the message)
LOAD_CASES = [
    ("missing", lambda server, service: "gradwire://run-000000000000/weights/nothing-here", False,
     gradwire.NotFoundError, grpc.StatusCode.NOT_FOUND, "gradwire://run-000000000000/weights/nothing-here"),
    # (The SDK reads tinker://... as gradwire://..., as code written for Tinker keeps such paths.)
    ("wrong scheme", lambda server, service: "s3://run-1/weights/a", False,
     gradwire.BadRequestError, grpc.StatusCode.INVALID_ARGUMENT, "path: 's3://run-1/weights/a'"),
    ("wrong kind", lambda server, service: "gradwire://run-1/checkpoints/a", True,
     gradwire.BadRequestError, grpc.StatusCode.INVALID_ARGUMENT, "kind 'checkpoints'"),
    ("too few parts", lambda server, service: "gradwire://run-1/weights", False,
     gradwire.BadRequestError, grpc.StatusCode.INVALID_ARGUMENT, "three parts"),
    ("escaping name", lambda server, service: "gradwire://run-1/weights/../../../etc", False,
     gradwire.BadRequestError, grpc.StatusCode.INVALID_ARGUMENT, "three parts"),
    ("escaping run", lambda server, service: "gradwire://../weights/a", False,
     gradwire.BadRequestError, grpc.StatusCode.INVALID_ARGUMENT, "run id '..'"),
    ("sampler with optimizer", lambda server, service: donor_checkpoint(server, service, "sampler_weights")[0],
     True, gradwire.BadRequestError, grpc.StatusCode.INVALID_ARGUMENT, "holds no optimizer state"),
    ("other base model", other_base_model, False,
     gradwire.ConflictError, grpc.StatusCode.FAILED_PRECONDITION, "of base model 'some-other-model'"),
    ("other LoRA rank", lambda server, service: donor_checkpoint(server, service, rank=8)[0], True,
     gradwire.ConflictError, grpc.StatusCode.FAILED_PRECONDITION, "does not fit training run"),
    ("truncated adapter", truncated("adapter_model.safetensors"), False,
     gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS, "adapter_model.safetensors has"),
    ("truncated optimizer", truncated("optimizer.pt"), True,
     gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS, "optimizer.pt has"),
    ("damaged adapter", flipped_byte, False,
     gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS, "does not match its sha256"),
    ("undecodable adapter", undecodable, False,
     gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS, "cannot be decoded"),
    ("optimizer state not AdamW's", optimizer_edited(lambda state: state["state"][1].pop("exp_avg")), True,
     gradwire.ConflictError, grpc.StatusCode.FAILED_PRECONDITION, "state of parameter 1 is not AdamW's"),
    ("optimizer step not a count", optimizer_edited(lambda state: state["state"][2].update(step=torch.zeros(2))),
     True, gradwire.ConflictError, grpc.StatusCode.FAILED_PRECONDITION, "step of parameter 2 is not a count"),
]


@pytest.mark.parametrize("case, make_path, with_optimizer, error, code, words", LOAD_CASES,
                         ids=[c[0] for c in LOAD_CASES])
def test_bad_checkpoint_is_rejected_and_changes_nothing(server, service, case, make_path, with_optimizer,
                                                        error, code, words):
    path = make_path(server, service)
    tc = trained_run(service)
    tc.forward_backward(random_data(60), "cross_entropy").result()  # pending gradients to protect
    before, optimizer_before = run_state(server, tc.model_id), optimizer_state(server, tc.model_id)
    with pytest.raises(error) as raised:
        (tc.load_state_with_optimizer(path) if with_optimizer else tc.load_state(path)).result()
    assert raised.value.code == code
    assert words in str(raised.value)
    assert_state_equal(before, run_state(server, tc.model_id))
    assert_optimizer_equal(optimizer_before, optimizer_state(server, tc.model_id))
    tc.forward(random_data(61), "cross_entropy").result()  # the run stays usable
    if case == "other LoRA rank":
        return  # a new run takes the checkpoint's rank: creating one from it is fine
    # Creating a run from the bad checkpoint fails the same way and leaves no run behind.
    runs_before = (set(server.engine.runs),
                   len(service.create_rest_client().list_training_runs(limit=10**6).result().training_runs))
    with pytest.raises(error, match=words.replace("(", r"\(")):
        service.create_training_client_from_state_with_optimizer(path) if with_optimizer \
            else service.create_training_client_from_state(path)
    assert (set(server.engine.runs),
            len(service.create_rest_client().list_training_runs(limit=10**6).result().training_runs)) == runs_before


def test_a_failed_load_aborts_the_requests_queued_behind_it(server, service, stubs):
    """A load that fails while running (a damaged file) aborts the run's requests already
    queued behind it: no optimizer step is taken on weights the user did not mean."""
    path = truncated("adapter_model.safetensors")(server, service)
    stub, operations = stubs
    run_id = new_run(stub, rank=4)
    forward_backward = stub.ForwardBackward(raw_request(run_id, 1, random_data(63)))
    operations.WaitOperation(operations_pb2.WaitOperationRequest(name=forward_backward.name))
    before = run_state(server, run_id)
    step = stub.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=3))  # held for seq_id 2
    load = stub.LoadWeights(pb.LoadWeightsRequest(model_id=run_id, seq_id=2, path=path))
    load_done = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=load.name))
    step_done = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=step.name))
    assert load_done.error.code == grpc.StatusCode.DATA_LOSS.value[0]
    assert step_done.error.code == grpc.StatusCode.ABORTED.value[0] and load.name in step_done.error.message
    assert_state_equal(before, run_state(server, run_id))


BAD_NAMES = ["a/b", "..", "", ".hidden", "../escape", "x y", "-dash", "é", "a" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_checkpoint_name_is_rejected_and_writes_nothing(server, service, name):
    tc = trained_run(service)
    files_before = checkpoint_files(server)
    before = run_state(server, tc.model_id)
    for save in (tc.save_state, tc.save_weights_for_sampler):
        with pytest.raises(gradwire.BadRequestError, match="is not a valid checkpoint name") as raised:
            save(name).result()
        assert raised.value.field_violations[0][0] == "name"
    assert checkpoint_files(server) == files_before
    assert_state_equal(before, run_state(server, tc.model_id))
    assert service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints == []


def test_saving_an_existing_name_is_already_exists(server, service):
    """Names are never reused: the first checkpoint stays exactly as it was."""
    tc = trained_run(service)
    path = tc.save_state("once").result().path
    folder = checkpoints.checkpoint_directory(server.server.checkpoint_root, path)
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    tc.forward_backward(random_data(62), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    with pytest.raises(gradwire.ConflictError, match="already exists") as raised:
        tc.save_state("once").result()
    assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == saved
    assert [c.path for c in service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints] == [path]


def test_a_duplicate_name_is_rejected_at_admission_and_aborts_nothing(server, stubs):
    """A save of a name that exists, or that a save queued before it will take, is the RPC's
    ALREADY_EXISTS: it only uses up its seq_id, so the run's requests queued behind it run."""
    stub, operations = stubs
    run_id = new_run(stub, rank=4)
    finished(operations, stub.SaveWeights(pb.SaveWeightsRequest(model_id=run_id, seq_id=1, name="taken")).name)
    with worker_busy(server):
        with pytest.raises(grpc.RpcError) as on_disk:
            stub.SaveWeights(pb.SaveWeightsRequest(model_id=run_id, seq_id=2, name="taken"))
        forward_backward = stub.ForwardBackward(raw_request(run_id, 3, random_data(64)))
        queued = stub.SaveWeightsForSampler(pb.SaveWeightsForSamplerRequest(model_id=run_id, seq_id=4,
                                                                            name="queued"))
        with pytest.raises(grpc.RpcError) as in_queue:
            stub.SaveWeightsForSampler(pb.SaveWeightsForSamplerRequest(model_id=run_id, seq_id=5,
                                                                       name="queued"))
        step = stub.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=6,
                                                  adam_params=pb.AdamParams(learning_rate=1e-2)))
    for raised in (on_disk, in_queue):
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "already" in raised.value.details()
    for name in (forward_backward.name, queued.name, step.name):
        assert not finished(operations, name).HasField("error")
    assert stub.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 1
    # Once the queued save ran, its name stays taken.
    with pytest.raises(grpc.RpcError) as again:
        stub.SaveWeightsForSampler(pb.SaveWeightsForSamplerRequest(model_id=run_id, seq_id=7, name="queued"))
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_rename_onto_an_existing_checkpoint_is_already_exists(tmp_path):
    """If another writer's folder appears between the existence check and the rename,
    the save is ALREADY_EXISTS (rename(2) refuses a non-empty target) and the other
    folder stays as it was."""
    temp, folder = tmp_path / ".tmp-new", tmp_path / "new"
    for made in (temp, folder):
        made.mkdir()
        (made / "file").write_text(made.name)
    with pytest.raises(ServiceError) as raised:
        checkpoints._rename_into_place(temp, folder, checkpoints.parse_path("gradwire://run-1/weights/new"))
    assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert (folder / "file").read_text() == "new"


def test_a_save_the_disk_refuses_is_failed_precondition_and_changes_nothing(server, service):
    """A save the disk refuses (here a file blocks the run's checkpoint folder; a full or
    read-only disk alike) is FAILED_PRECONDITION naming the checkpoint and the cause, not
    INTERNAL (a server bug); nothing changes, and once the disk is fixed the same save works."""
    tc = trained_run(service)
    path = f"gradwire://{tc.model_id}/weights/blocked"
    blocked = checkpoints.parse_path(path).folder(server.server.checkpoint_root).parent
    assert not blocked.exists()
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a folder")
    files_before, before = checkpoint_files(server), run_state(server, tc.model_id)
    with pytest.raises(gradwire.APIStatusError) as raised:
        tc.save_state("blocked").result()
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(raised.value).startswith(f"FAILED_PRECONDITION: checkpoint {path} was not written: [Errno ")
    assert checkpoint_files(server) == files_before
    assert_state_equal(before, run_state(server, tc.model_id))
    blocked.unlink()
    assert tc.save_state("blocked").result().path == path
