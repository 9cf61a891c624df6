"""Checkpoints: peft-format folders, ordered save/load, exact resume in a restarted
server, crash leftovers, unload. Compared against in-process peft and files on disk."""
from __future__ import annotations

import gc
import json
import shutil
import weakref

import grpc
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc

import gradwire
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import checkpoints
from gradwire_server.models import tiny_random_model
from conftest import start_cli_server
from reference import (assert_optimizer_equal, optimizer_state, random_data, raw_request,
                       reference_logprobs, run_state, trained_run)

ADAM = gradwire.AdamParams(learning_rate=1e-2)


def folder_of(server, path: str):
    return checkpoints.checkpoint_directory(server.server.checkpoint_root, path)


def adapter_file(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def as_adapter(state: dict, run_id: str) -> dict[str, torch.Tensor]:
    """run_state weights under peft's state-dict names (as in adapter_model.safetensors)."""
    return {name.replace(f".{run_id}.", "."): weight for name, (weight, _) in state.items()}


def assert_tensors_equal(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name].cpu(), right[name].cpu()), f"{name} differs"


def train_steps(tc, seeds) -> None:
    """One forward_backward + optim_step per seed, pipelined; returns when all ran."""
    steps = []
    for seed in seeds:
        tc.forward_backward(random_data(seed), "cross_entropy")
        steps.append(tc.optim_step(ADAM))
    for step in steps:
        step.result()


def test_checkpoint_folder_loads_in_peft_with_the_same_logprobs(server, service):
    """Both checkpoint kinds are standard peft adapter folders: PeftModel.from_pretrained on
    an in-process tiny-random gives the server's forward logprobs."""
    tc = trained_run(service)
    data = random_data(7)
    served = tc.forward(data, "cross_entropy").result()
    training = folder_of(server, tc.save_state("peft").result().path)
    sampler = folder_of(server, tc.save_weights_for_sampler("peft").result().path)
    assert sorted(p.name for p in training.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "gradwire_checkpoint.json", "optimizer.pt"]
    assert sorted(p.name for p in sampler.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "gradwire_checkpoint.json"]
    config = json.loads((sampler / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["inference_mode"] is False and config["base_model_name_or_path"] == "tiny-random"
    for folder in (training, sampler):
        model = peft.PeftModel.from_pretrained(tiny_random_model(), folder)
        with torch.no_grad():
            for datum, output in zip(data, served.loss_fn_outputs):
                np.testing.assert_allclose(output["logprobs"].to_numpy(),
                                           reference_logprobs(model, datum).numpy(), atol=1e-5)


def test_save_waits_for_the_requests_before_it(server, service):
    """A SaveWeights that reaches the server before the requests ordered ahead of it
    is held until they ran: it holds the weights after the optimizer step."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=3)
    initial = as_adapter(run_state(server, tc.model_id), tc.model_id)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TrainingServiceStub(channel)
        save = stub.SaveWeights(pb.SaveWeightsRequest(model_id=tc.model_id, seq_id=3, name="after-step"))
        stub.ForwardBackward(raw_request(tc.model_id, 1, random_data(8)))
        stub.OptimStep(pb.OptimStepRequest(model_id=tc.model_id, seq_id=2,
                                           adam_params=pb.AdamParams(learning_rate=1e-2)))
        done = operations_pb2_grpc.OperationsStub(channel).WaitOperation(
            operations_pb2.WaitOperationRequest(name=save.name))
    assert done.done and not done.HasField("error")
    saved = adapter_file(folder_of(server, f"gradwire://{tc.model_id}/weights/after-step"))
    assert_tensors_equal(saved, as_adapter(run_state(server, tc.model_id), tc.model_id))
    assert any(not torch.equal(saved[name], initial[name].cpu()) for name in saved)


def test_load_state_restores_weights_and_optimizer(server, service):
    """load_state puts back the checkpoint's weights with a fresh optimizer and no gradients;
    load_state_with_optimizer puts back the AdamW state too."""
    tc = trained_run(service)
    path = tc.save_state("before").result().path
    saved_weights = as_adapter(run_state(server, tc.model_id), tc.model_id)
    saved_optimizer = optimizer_state(server, tc.model_id)
    tc.forward_backward(random_data(9), "cross_entropy")
    tc.optim_step(ADAM)
    tc.forward_backward(random_data(10), "cross_entropy").result()  # gradients pending

    assert tc.load_state(path).result().path == path
    state = run_state(server, tc.model_id)
    assert_tensors_equal(as_adapter(state, tc.model_id), saved_weights)
    assert all(grad is None for _, grad in state.values())
    assert optimizer_state(server, tc.model_id) == {}

    tc.optim_step(ADAM).result()  # no gradient: the weights stay, but give the optimizer state
    tc.load_state_with_optimizer(path).result()
    assert_optimizer_equal(optimizer_state(server, tc.model_id), saved_optimizer)
    assert tc.get_info().step == 1


def test_exact_resume_in_a_restarted_server(tmp_path):
    """3 steps, save_state, 2 steps == a fresh server process loading that checkpoint with its
    optimizer and taking the same 2 steps: bit-identical adapter weights. Without the optimizer
    state the result differs. The run index and checkpoints survive the restart; crash leftovers
    (a temporary folder, a folder without its marker) are neither listed nor loadable."""
    process, address = start_cli_server("--checkpoint-dir", str(tmp_path))
    try:
        with gradwire.ServiceClient(base_url=address, progress=False) as service:
            tc = service.create_lora_training_client("tiny-random", rank=4, seed=0,
                                                     user_metadata={"purpose": "resume"})
            train_steps(tc, [11, 12, 13])
            path = tc.save_state("step3").result().path
            tc.save_weights_for_sampler("removed").result()
            train_steps(tc, [14, 15])
            original = tc.save_weights_for_sampler("final").result().path
            original_run = tc.model_id
    finally:
        process.terminate()
        process.wait(timeout=30)

    # What a crash mid-save can leave, and a checkpoint removed while the server was down.
    run_folder = tmp_path / original_run
    shutil.copytree(run_folder / "weights" / "step3", run_folder / "weights" / ".tmp-step4-0badc0de")
    shutil.copytree(run_folder / "weights" / "step3", run_folder / "weights" / "unfinished")
    (run_folder / "weights" / "unfinished" / "gradwire_checkpoint.json").unlink()
    shutil.rmtree(run_folder / "sampler_weights" / "removed")

    process, address = start_cli_server("--checkpoint-dir", str(tmp_path))
    try:
        with gradwire.ServiceClient(base_url=address, progress=False) as service:
            rest = service.create_rest_client()
            old = rest.get_training_run(original_run).result()
            assert (old.loaded, old.step, old.user_metadata) == (False, 5, {"purpose": "resume"})
            assert [c.path for c in rest.list_checkpoints(original_run).result().checkpoints] == [path, original]
            assert not (run_folder / "weights" / ".tmp-step4-0badc0de").exists()  # cleaned up at start
            for leftover in ("weights/unfinished", "weights/.tmp-step4-0badc0de", "sampler_weights/removed"):
                with pytest.raises((gradwire.NotFoundError, gradwire.BadRequestError)):
                    service.create_training_client_from_state(f"gradwire://{original_run}/{leftover}")

            resumed = service.create_training_client_from_state_with_optimizer(path)
            assert resumed.model_id != original_run and resumed.get_info().step == 3
            train_steps(resumed, [14, 15])
            resumed_final = resumed.save_weights_for_sampler("final").result().path

            fresh_optimizer = service.create_training_client_from_state(path)
            train_steps(fresh_optimizer, [14, 15])
            without_optimizer = fresh_optimizer.save_weights_for_sampler("final").result().path

            run = rest.get_training_run(resumed.model_id).result()
            assert (run.loaded, run.source_checkpoint, run.step) == (True, path, 5)
            assert {r.training_run_id for r in rest.list_training_runs().result().training_runs} == {
                original_run, resumed.model_id, fresh_optimizer.model_id}
    finally:
        process.terminate()
        process.wait(timeout=30)

    def weights(checkpoint_path: str) -> dict[str, torch.Tensor]:
        return adapter_file(checkpoints.checkpoint_directory(tmp_path, checkpoint_path))

    assert_tensors_equal(weights(resumed_final), weights(original))
    assert any(not torch.equal(weights(without_optimizer)[n], weights(original)[n]) for n in weights(original))


def test_unload_frees_the_adapter_and_optimizer(server, service):
    """unload removes the adapter's parameters from the model and the run from the engine
    (nothing keeps them alive); the run's later calls fail clearly; it is listed as not
    loaded, and its checkpoints still load into a new run."""
    tc = trained_run(service)
    path = tc.save_state("kept").result().path

    def references():
        run = server.engine.run(tc.model_id)
        return weakref.ref(run.params[0]), weakref.ref(run.optimizer), weakref.ref(run)

    refs = server.call(references)
    unload = tc.unload()
    queued = tc.forward(random_data(16), "cross_entropy")
    assert unload.result().model_id == tc.model_id
    with pytest.raises(gradwire.ConflictError, match="not loaded"):
        queued.result()
    server.call(gc.collect)
    assert all(ref() is None for ref in refs)
    assert tc.model_id not in server.engine.runs
    names = server.call(lambda: [name for name, _ in server.engine.peft_model.named_parameters()])
    assert not [name for name in names if f".{tc.model_id}." in name]
    with pytest.raises(gradwire.ConflictError, match="not loaded"):
        tc.get_info()
    with pytest.raises(gradwire.ConflictError, match="not loaded"):
        tc.unload().result()
    assert service.create_rest_client().get_training_run(tc.model_id).result().loaded is False
    reloaded = service.create_training_client_from_state(path)
    reloaded.forward(random_data(17), "cross_entropy").result()


def test_async_twins_double_await(server, service):
    """The _async twins return the APIFuture once the request has its place in the order."""
    import asyncio

    tc = trained_run(service)

    async def flow():
        saved = await (await tc.save_state_async("async"))
        sampler = await (await tc.save_weights_for_sampler_async("async"))
        loaded = await (await tc.load_state_with_optimizer_async(saved.path))
        resumed = await service.create_training_client_from_state_with_optimizer_async(saved.path)
        unloaded = await (await resumed.unload_async())
        return saved, sampler, loaded, unloaded, resumed

    saved, sampler, loaded, unloaded, resumed = asyncio.run(flow())
    assert saved.path == f"gradwire://{tc.model_id}/weights/async" == loaded.path
    assert sampler.path == f"gradwire://{tc.model_id}/sampler_weights/async"
    assert unloaded.model_id == resumed.model_id not in server.engine.runs


def test_create_is_idempotent_per_request_id(server, service, stubs):
    """A CreateModel or CreateModelFromState repeated with its request_id (a retry after a
    lost reply) returns the run the first one created; another request_id creates another."""
    stub, _ = stubs
    path = trained_run(service).save_state("origin").result().path
    requests = [pb.CreateModelRequest(base_model="tiny-random", lora_config=pb.LoraConfig(rank=2, seed=0), request_id="create-a"),
                pb.CreateModelFromStateRequest(path=path, request_id="from-state-a")]
    for request, create in zip(requests, (stub.CreateModel, stub.CreateModelFromState)):
        runs_before = set(server.engine.runs)
        first, retry = create(request).model_id, create(request).model_id
        assert first == retry and set(server.engine.runs) - runs_before == {first}
        request.request_id += "-other"
        other = create(request).model_id
        assert other != first and set(server.engine.runs) - runs_before == {first, other}


def test_a_request_id_sent_again_with_other_fields_is_refused(server, service, stubs):
    """Not a retry: the first request's run would be this one's silently (a rank-2 run for a
    rank-8 request). ALREADY_EXISTS names the request_id, and nothing is created."""
    stub, _ = stubs
    path = trained_run(service).save_state("reused-id").result().path
    first = stub.CreateModel(pb.CreateModelRequest(base_model="tiny-random", lora_config=pb.LoraConfig(rank=2),
                                                   request_id="reused")).model_id
    runs = set(server.engine.runs)
    for create, request in [
            (stub.CreateModel, pb.CreateModelRequest(base_model="tiny-random", lora_config=pb.LoraConfig(rank=8),
                                                     request_id="reused")),
            (stub.CreateModel, pb.CreateModelRequest(base_model="tiny-random", lora_config=pb.LoraConfig(rank=2),
                                                     user_metadata={"a": "b"}, request_id="reused")),
            (stub.CreateModelFromState, pb.CreateModelFromStateRequest(path=path, request_id="reused"))]:
        with pytest.raises(grpc.RpcError) as raised:
            create(request)
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "request_id 'reused' was sent before with other fields" in raised.value.details()
    assert set(server.engine.runs) == runs
    assert stub.CreateModel(pb.CreateModelRequest(base_model="tiny-random", lora_config=pb.LoraConfig(rank=2),
                                                  request_id="reused")).model_id == first


def test_a_failed_index_write_does_not_fail_a_change_already_made(server, service, caplog):
    """If the run index cannot be written after the engine changed a run (here a real
    SQLite error from a trigger), the optimizer step, load or creation still succeeds."""
    tc = trained_run(service)
    path = tc.save_state("indexed").result().path
    index = server.server.index
    index._execute(f"CREATE TEMP TRIGGER refuse_update BEFORE UPDATE ON training_runs "
                   f"WHEN NEW.run_id = '{tc.model_id}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    index._execute(f"CREATE TEMP TRIGGER refuse_insert BEFORE INSERT ON training_runs "
                   f"WHEN NEW.source_checkpoint = '{path}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    try:
        before = as_adapter(run_state(server, tc.model_id), tc.model_id)
        tc.forward_backward(random_data(18), "cross_entropy")
        tc.optim_step(ADAM).result()
        assert tc.get_info().step == 2
        assert any(not torch.equal(before[n], weights) for n, weights in
                   as_adapter(run_state(server, tc.model_id), tc.model_id).items())
        tc.load_state(path).result()
        assert_tensors_equal(as_adapter(run_state(server, tc.model_id), tc.model_id), before)
        created = service.create_training_client_from_state(path)
        assert created.get_info().step == 1
        assert [r.getMessage() for r in caplog.records if r.name == "gradwire_server.run_index"] == [
            f"run index: cannot record the step of {tc.model_id}"] * 2 + [
            f"run index: cannot record new run {created.model_id}"]
    finally:
        index._execute("DROP TRIGGER refuse_update")
        index._execute("DROP TRIGGER refuse_insert")
