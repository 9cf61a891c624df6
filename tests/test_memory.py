"""Memory: every way a pass can be abandoned (a forward graph over the keep budget,
a cancelled or failed leg, a kept graph that expires) frees every tensor, counted
exactly over 30+ calls; a request that runs out of memory fails alone with
RESOURCE_EXHAUSTED and changes nothing; the sizes the server chose are reported."""
from __future__ import annotations

import gc
import warnings
import weakref

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2
from peft.tuners.lora import LoraLayer

import gradwire
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import memory
from gradwire_server.batch import DatumArrays, LoraSettings
from gradwire_server.engine import Engine
from gradwire_server.kv_cache import BLOCK_TOKENS
from gradwire_server.models import load_model
from conftest import server_config
from gradwire_server.server import BackgroundServer
from reference import (assert_state_equal, cross_entropy_gradient_error, engine_setting, finished, micro_batch_tokens,
                       random_data, raw_request, reference_model, run_state, succeeded, trained_run, worker_busy)

CALLS = 30
LENGTHS = (64, 64, 64, 64)
TOLERANCE = 1e-5


def squared_logprob_loss(data, logprobs):
    return (torch.cat(logprobs) ** 2).sum(), {}


def live_tensors(server) -> int:
    """Tensors alive in the server's process (collected first), counted on its worker."""
    def count() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() wakes deprecated torch module attributes
            warnings.simplefilter("ignore")
            return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))
    return server.call(count)


def out_of_memory_at(calls: set[int]):
    """A before_forward hook that fails the micro-batch forwards numbered in `calls`
    (from 1) as CUDA's allocator does."""
    count = 0

    def fail(datums: int, length: int) -> None:
        nonlocal count
        count += 1
        if count in calls:
            raise torch.OutOfMemoryError(f"injected: {datums} x {length} tokens")
    return fail


def forward_request(run_id: str, seq_id: int, data, keep_graph: bool = False, reuse: str = ""):
    request = raw_request(run_id, seq_id, data)
    request.keep_graph, request.reuse_forward = keep_graph, reuse
    return request


def assert_flat(server, run_id: str, repeat) -> None:
    """`repeat(i)` leaves no tensor behind: the count after a warm-up call equals
    the count after CALLS more, and the run holds no kept graph."""
    repeat(0)
    before = live_tensors(server)
    for i in range(1, CALLS + 1):
        repeat(i)
    assert live_tensors(server) == before
    assert not server.call(lambda: run_id in server.engine.kept)


def test_custom_loss_over_the_keep_budget_leaves_no_tensor(server, service):
    """The repro of the leak: every forward graph over budget was never freed."""
    tc = trained_run(service)
    data = random_data(60, lengths=LENGTHS)
    with engine_setting(server, "keep_graph_budget_bytes", 1):
        assert_flat(server, tc.model_id,
                    lambda i: tc.forward_backward_custom(data, squared_logprob_loss).result())


def test_custom_loss_within_the_budget_leaves_no_tensor(server, service):
    tc = trained_run(service)
    data = random_data(61, lengths=LENGTHS)
    assert_flat(server, tc.model_id,
                lambda i: tc.forward_backward_custom(data, squared_logprob_loss).result())


def test_expired_kept_graphs_leave_no_tensor(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    data = random_data(62, lengths=LENGTHS)

    def kept_then_expired(i: int) -> None:
        forward = training.Forward(forward_request(tc.model_id, 3 + i, data, keep_graph=True)).name
        response = pb.ForwardBackwardOutput()
        succeeded(operations, forward).response.Unpack(response)
        assert response.graph_kept
        server.call(lambda: [setattr(kept, "expires_at", 0.0) for kept in server.engine.kept.values()])
        server.call(server.engine.drop_expired_graphs)

    assert_flat(server, tc.model_id, kept_then_expired)


def test_cancelled_backward_legs_leave_no_tensor(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    data = random_data(63, lengths=LENGTHS)

    def cancelled_leg(i: int) -> None:
        forward = training.Forward(forward_request(tc.model_id, 3 + 2 * i, data, keep_graph=True)).name
        succeeded(operations, forward)
        with worker_busy(server):
            backward = training.ForwardBackward(forward_request(tc.model_id, 4 + 2 * i, data,
                                                                reuse=forward)).name
            operations.CancelOperation(operations_pb2.CancelOperationRequest(name=backward))
        assert finished(operations, backward).error.code == grpc.StatusCode.CANCELLED.value[0]
        server.call(lambda: None)  # the worker has discarded the cancelled job

    assert_flat(server, tc.model_id, cancelled_leg)


def test_failed_legs_leave_no_tensor_and_change_nothing(server, service, stubs):
    """A forward leg that fails after keeping its first micro-batch's graph, and a
    backward leg that fails after backpropagating through the kept graph's prefix."""
    training, operations = stubs
    tc = trained_run(service)
    data = random_data(64, lengths=LENGTHS)
    changed = data[:2] + random_data(65, lengths=LENGTHS[2:])
    before = run_state(server, tc.model_id)

    def failing_legs(i: int) -> None:
        seq = 3 + 3 * i
        with engine_setting(server, "before_forward", out_of_memory_at({2})):
            forward = training.Forward(forward_request(tc.model_id, seq, data, keep_graph=True)).name
            assert finished(operations, forward).error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        kept = training.Forward(forward_request(tc.model_id, seq + 1, data, keep_graph=True)).name
        succeeded(operations, kept)
        with engine_setting(server, "before_forward", out_of_memory_at({1})):
            backward = training.ForwardBackward(forward_request(tc.model_id, seq + 2, changed, reuse=kept)).name
            assert finished(operations, backward).error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

    with micro_batch_tokens(server, 2 * LENGTHS[0]):  # two datums per micro-batch
        assert_flat(server, tc.model_id, failing_legs)
    assert_state_equal(before, run_state(server, tc.model_id))


def test_out_of_memory_fails_the_request_alone(server, service, stubs):
    """RESOURCE_EXHAUSTED names the micro-batch and the free memory; nothing changed;
    the next request of the same run, and other runs, are served exactly."""
    training, operations = stubs
    tc, other = trained_run(service), trained_run(service, seed=1)
    model = reference_model(server, tc.model_id, rank=4)
    data = random_data(66, lengths=(9, 14, 5, 12))
    before = run_state(server, tc.model_id)
    with engine_setting(server, "before_forward", out_of_memory_at({1})):
        name = training.ForwardBackward(raw_request(tc.model_id, 3, data)).name
        error = finished(operations, name).error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "4 datums x 14 tokens" in error.message and "GiB free" in error.message
    assert_state_equal(before, run_state(server, tc.model_id))

    other.forward_backward(random_data(67), "cross_entropy").result()
    succeeded(operations, training.ForwardBackward(raw_request(tc.model_id, 4, data)).name)
    assert cross_entropy_gradient_error(server, tc.model_id, model, data) <= TOLERANCE


def test_out_of_memory_reaches_the_sdk(server, service):
    tc = trained_run(service)
    with engine_setting(server, "before_forward", out_of_memory_at({1})):
        with pytest.raises(gradwire.APIStatusError) as raised:
            tc.forward_backward(random_data(68), "cross_entropy").result()
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"out of {server.engine.device.type} memory" in str(raised.value)


def test_capabilities_report_the_sizes(server, service, stubs):
    limits = stubs[0].GetServerCapabilities(pb.GetServerCapabilitiesRequest()).limits
    engine = server.engine
    assert (limits.micro_batch_tokens, limits.keep_graph_budget_bytes) == (
        engine.micro_batch_tokens, engine.keep_graph_budget_bytes)
    sdk_capabilities = service.get_server_capabilities()
    for key in ("micro_batch_tokens", "keep_graph_budget_bytes", "activation_bytes_per_token"):
        assert sdk_capabilities.limits[key] == getattr(limits, key)
    assert sdk_capabilities.dtype == str(engine.dtype).removeprefix("torch.")
    assert sdk_capabilities.kv_cache["budget_bytes"] > 0
    assert sdk_capabilities.kv_cache["block_tokens"] == BLOCK_TOKENS
    assert sdk_capabilities.training == {"compiled_layers": False, "activation_checkpointing": False,
                                         "attention": "auto"}
    assert limits.activation_bytes_per_token > 0  # the probe's measurement
    if engine.device.type == "cpu":  # tiny-random: 256 MiB of activations is more than the most tokens
        assert limits.micro_batch_tokens == memory.CPU_MICRO_BATCH_TOKENS
        assert limits.keep_graph_budget_bytes == memory.CPU_KEEP_GRAPH_BUDGET_BYTES
    else:  # sized from the card's free memory
        assert memory.MIN_MICRO_BATCH_TOKENS <= limits.micro_batch_tokens <= memory.MAX_MICRO_BATCH_TOKENS
        assert limits.keep_graph_budget_bytes > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's plan")
@pytest.mark.parametrize("activation_mib", [2, 8])
def test_on_the_cpu_a_micro_batch_holds_a_fixed_amount_of_activations(tmp_path, monkeypatch, activation_mib):
    """The probe's bytes per token size the CPU's micro-batches to CPU_ACTIVATION_BYTES (made
    small here, so that tiny-random's are below the cap): a batch then runs in several
    micro-batches, and trains as one pass over it does."""
    monkeypatch.setattr(memory, "CPU_ACTIVATION_BYTES", activation_mib * 2**20)
    background = BackgroundServer(server_config(checkpoint_dir=tmp_path))
    service = gradwire.ServiceClient(base_url=background.address, progress=False)
    try:
        limits = service.get_server_capabilities().limits
        per_token = limits["activation_bytes_per_token"]
        assert per_token > 0
        expected = max(memory.MIN_MICRO_BATCH_TOKENS, activation_mib * 2**20 // per_token // 256 * 256)
        assert expected < memory.CPU_MICRO_BATCH_TOKENS
        assert limits["micro_batch_tokens"] == background.engine.micro_batch_tokens == expected
        tc = service.create_lora_training_client("tiny-random", rank=4, seed=0)
        data = random_data(11, lengths=(120,) * 8)  # 960 padded tokens: several micro-batches
        model = reference_model(background, tc.model_id, rank=4)
        tc.forward_backward(data, "cross_entropy").result()
        assert cross_entropy_gradient_error(background, tc.model_id, model, data) <= 1e-5
    finally:
        service.close()
        background.stop()


def test_flags_set_the_sizes(tmp_path):
    background = BackgroundServer(server_config(checkpoint_dir=tmp_path,
                                               micro_batch_tokens=4096, keep_graph_budget_mb=10))
    try:
        with grpc.insecure_channel(background.address) as channel:
            limits = pb_grpc.TrainingServiceStub(channel).GetServerCapabilities(
                pb.GetServerCapabilitiesRequest()).limits
        assert (limits.micro_batch_tokens, limits.keep_graph_budget_bytes) == (4096, 10 * 2**20)
        assert background.engine.micro_batch_tokens == 4096
    finally:
        background.stop()


def test_probe_measures_a_token_and_leaves_the_engine_as_it_was(server, service):
    tc = trained_run(service)
    before = run_state(server, tc.model_id)
    adapters = server.call(lambda: sorted(server.engine.peft_model.peft_config))
    per_token = server.call(lambda: server.engine.activation_bytes_per_token(32))
    # At least the decoder's hidden states of every layer, in float32.
    config = server.engine.base.model.config
    assert per_token >= config.num_hidden_layers * config.hidden_size * 4
    assert server.call(lambda: sorted(server.engine.peft_model.peft_config)) == adapters
    assert server.call(lambda: server.engine.peft_model.active_adapter) in adapters
    assert_state_equal(before, run_state(server, tc.model_id))
    trained_run(service, seed=2)  # runs are still created and trained


def test_probe_as_the_first_adapter_leaves_a_working_engine():
    """The probe runs right after loading, before any run: peft wraps the model for it,
    and afterwards the model is given back unwrapped (peft's wrappers would slow the
    base model's sampling). Runs created after it train exactly as on an engine that
    never probed."""
    def trained_gradients(probe: bool) -> list[torch.Tensor]:
        engine = Engine(load_model("tiny-random", torch.device("cpu")), torch.device("cpu"))
        if probe:
            assert engine.activation_bytes_per_token(16) > 0
            assert not engine.runs and engine.peft_model is None
            assert not any(isinstance(module, LoraLayer) for module in engine.base.model.modules())
        run_id = engine.create_run(LoraSettings(rank=2, seed=0))
        for p in engine.run(run_id).params:  # non-zero B factors too, so that every factor has a gradient
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        training = engine.start_pass(run_id, "cross_entropy", {}, backward=True)
        sequence = np.arange(10)
        training.feed([DatumArrays(sequence, {"target_tokens": sequence})])
        training.commit()
        return [p.grad for p in engine.run(run_id).params]

    probed, plain = trained_gradients(True), trained_gradients(False)
    assert all(g.abs().sum() > 0 for g in probed)
    for a, b in zip(probed, plain, strict=True):
        assert torch.equal(a, b)


def test_a_committed_pass_holds_no_gradient_buffer():
    """A pass's staged gradient is a buffer the size of the run's LoRA weights: once the pass
    has committed it (added into the run's gradient, or become it), the pass (which the
    worker keeps until its next job) must not keep it alive."""
    engine = Engine(load_model("tiny-random", torch.device("cpu")), torch.device("cpu"))
    run_id = engine.create_run(LoraSettings(rank=2, seed=0))
    sequence = np.arange(10)
    passes = []
    for _ in range(2):  # the first pass's buffer becomes the run's gradient; the second's is added to it
        training = engine.start_pass(run_id, "cross_entropy", {}, backward=True)
        training.feed([DatumArrays(sequence, {"target_tokens": sequence})])
        staged = weakref.ref(training.staged)
        training.commit()
        passes.append((training, staged))
    gc.collect()
    assert passes[0][1]() is engine.run(run_id).grad
    assert passes[1][1]() is None


def test_a_kept_forward_counts_its_activations_and_not_the_weights():
    """The keep-graph budget is charged what a kept forward holds: the tensors autograd saves
    for its backward, except the weights (the base model's, the run's LoRA factors), which
    are held anyway, with other runs' adapters in the model too. Counted again here by a
    second, identical pass, every parameter of the model excluded."""
    engine = Engine(load_model("tiny-random", torch.device("cpu")), torch.device("cpu"))
    runs = [engine.create_run(LoraSettings(rank=rank, seed=0, train_unembed=True)) for rank in (2, 4)]
    data = [DatumArrays(np.arange(12), {"target_tokens": np.arange(1, 13)})] * 2
    for run_id in runs:
        kept = engine.start_pass(run_id, "cross_entropy", {}, backward=False, keep_graph=True)
        kept.feed(data)
        weights = {p.untyped_storage().data_ptr() for p in engine.peft_model.parameters()}
        saved: dict[int, int] = {}  # storage -> bytes, of what autograd saves that is no weight

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in weights:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor.detach()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logprobs, inputs = engine.micro_batch_logprobs(engine.run(run_id), data)
            engine.loss(logprobs, inputs, "cross_entropy", {})
        assert kept.saved_bytes.nbytes == sum(saved.values()) > 0


def test_plan_from_free_memory():
    per_token = 2 * 2**20
    tokens, budget = memory.plan_from_free(80 * 2**30, per_token)
    usable = 80 * 2**30 * (1 - memory.HEADROOM_FRACTION)
    assert tokens % 256 == 0 and tokens * per_token <= usable / 2 < (tokens + 256) * per_token
    assert budget == int(usable) - tokens * per_token
    assert memory.plan_from_free(2**30, per_token) == (memory.MIN_MICRO_BATCH_TOKENS, 0)
    assert memory.plan_from_free(2**40, 1)[0] == memory.MAX_MICRO_BATCH_TOKENS


def test_out_of_memory_outside_a_loss_pass_fails_alone(server, service):
    """Sampling that runs out of memory (raised by the model's decoder) is
    RESOURCE_EXHAUSTED too, and the next request is served."""
    def out_of_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("injected")

    decoder = server.engine.base.model.get_decoder()
    handle = server.call(lambda: decoder.register_forward_pre_hook(out_of_memory, with_kwargs=True))
    sampler = service.create_sampling_client(base_model="tiny-random")
    prompt, params = gradwire.ModelInput.from_ints([1, 2, 3]), gradwire.SamplingParams(max_tokens=4, seed=0)
    try:
        with pytest.raises(gradwire.APIStatusError) as raised:
            sampler.sample(prompt, 1, params).result()
    finally:
        server.call(handle.remove)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of device memory" in str(raised.value)
    assert len(sampler.sample(prompt, 1, params).result().sequences[0].tokens) == 4
