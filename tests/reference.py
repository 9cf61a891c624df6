"""In-process PyTorch reference: the same tiny-random model and the same LoRA
weights as a server run, on the server's device and in its dtype, for exactness
checks, plus snapshots of a run's state and helpers for requests over the raw
stubs. Reference logprobs come back on the CPU."""
from __future__ import annotations

import contextlib
import threading
import time

import grpc
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import numpy as np
import peft
import torch

import gradwire
from gradwire import _convert
from gradwire.v1 import resource_service_pb2, sampling_service_pb2
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server.models import cast_base, tiny_random_model
from gradwire_server.server import OUTPUTS_FOLDER

# Every service a gradwire server answers, and each (service name, method) pair.
SERVICES = [pb.DESCRIPTOR.services_by_name["TrainingService"],
            sampling_service_pb2.DESCRIPTOR.services_by_name["SamplingService"],
            resource_service_pb2.DESCRIPTOR.services_by_name["ResourceService"],
            operations_pb2.DESCRIPTOR.services_by_name["Operations"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
METHODS = [(service.full_name, method) for service in SERVICES for method in service.methods]

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def run_state(server, run_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name -> (weight, accumulated grad) of the run's adapter, copied on the server's worker."""
    def read():
        return {name: (p.detach().clone(), None if p.grad is None else p.grad.clone())
                for name, p in server.engine.peft_model.named_parameters() if f".{run_id}." in name}
    return server.call(read)


def assert_state_equal(before: dict, after: dict) -> None:
    """Exact equality of weights and gradients (nothing changed)."""
    assert before.keys() == after.keys()
    for name, (weight, grad) in before.items():
        weight_after, grad_after = after[name]
        assert torch.equal(weight, weight_after), f"weight {name} changed"
        assert (grad is None) == (grad_after is None), f"grad {name} appeared or vanished"
        if grad is not None:
            assert torch.equal(grad, grad_after), f"grad {name} changed"


def optimizer_state(server, run_id: str) -> dict:
    """A copy of the run's AdamW state (per-parameter tensors), read on the server's worker."""
    def read():
        state = server.engine.run(run_id).optimizer.state_dict()["state"]
        return {index: {key: value.clone() for key, value in entry.items()} for index, entry in state.items()}
    return server.call(read)


def assert_optimizer_equal(before: dict, after: dict) -> None:
    """Exact equality of two optimizer_state snapshots."""
    assert before.keys() == after.keys()
    for index, entry in before.items():
        assert entry.keys() == after[index].keys()
        for key, value in entry.items():
            assert torch.equal(value, after[index][key]), f"optimizer {key} of parameter {index} changed"


def reference_base_model(server) -> torch.nn.Module:
    """A fresh tiny-random on the server's device, its weights in the server's dtype."""
    return cast_base(tiny_random_model().to(server.engine.device), server.engine.dtype)


def reference_model(server, run_id: str, rank: int) -> peft.PeftModel:
    """A fresh in-process tiny-random with a LoRA adapter holding the run's current weights
    (float32, as the server keeps them)."""
    model = peft.get_peft_model(
        reference_base_model(server),
        peft.LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_MODULES))
    weights = {name.replace(f".{run_id}.", ".default."): weight
               for name, (weight, _) in run_state(server, run_id).items()}
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return model


@torch.no_grad()
def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Full-recompute argmax loop (no KV cache) on the model's device."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def sequence_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's float32 logits [L, V] for one sequence, computed on the
    model's device, returned on the CPU."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_logprobs(model, datum: gradwire.Datum) -> torch.Tensor:
    """log_softmax(logits) at the target tokens, for one unpadded sequence, on the CPU
    (computed on the model's device, under bf16 autocast for a bf16 model)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([datum.model_input.to_ints()], device=device)
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().to(device)
    bf16 = model.get_output_embeddings().weight.dtype == torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=tokens).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if targets.ndim == 1:
        return logprobs.gather(-1, targets[:, None])[:, 0].cpu()
    return logprobs.gather(-1, targets).cpu()


def reference_gradients(model, run_id: str) -> dict[str, torch.Tensor]:
    """The reference adapter's .grad, named as the server run's parameters."""
    return {name.replace(".default.", f".{run_id}."): p.grad.clone()
            for name, p in model.named_parameters() if ".default." in name and p.grad is not None}


def relative_error(server_grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """||server - expected|| / ||expected|| over every adapter parameter."""
    assert server_grads.keys() == expected.keys()
    names = sorted(expected)
    got = torch.cat([server_grads[n].reshape(-1).double().cpu() for n in names])
    want = torch.cat([expected[n].reshape(-1).double().cpu() for n in names])
    assert want.norm() > 0
    return float((got - want).norm() / want.norm())


def cross_entropy_gradient_error(server, run_id: str, model, data: list[gradwire.Datum]) -> float:
    """Backpropagates the reference model's cross-entropy (weighted -logprobs) of `data`,
    and gives relative_error of the server's accumulated gradients of `run_id` against it."""
    sum(-(reference_logprobs(model, d) * d.loss_fn_inputs["weights"].to_torch()).sum() for d in data).backward()
    return relative_error(server_gradients(server, run_id), reference_gradients(model, run_id))


def checkpoint_files(server) -> list[str]:
    """Every file and folder under the server's checkpoint folder but the run index's files and
    the operations' output spools (which come and go with operations, e.g. as other tests'
    results are fetched in the background)."""
    root = server.server.checkpoint_root
    return sorted(str(p) for p in root.rglob("*")
                  if "index.sqlite3" not in p.name and OUTPUTS_FOLDER not in p.relative_to(root).parts)


def server_gradients(server, run_id: str) -> dict[str, torch.Tensor]:
    return {name: grad for name, (_, grad) in run_state(server, run_id).items() if grad is not None}


def new_run(training, rank: int = 2, seed: int = 0) -> str:
    """The model_id of a new tiny-random LoRA run, created over the raw TrainingService stub."""
    return training.CreateModel(pb.CreateModelRequest(base_model="tiny-random",
                                                      lora_config=pb.LoraConfig(rank=rank, seed=seed))).model_id


def raw_request(model_id: str, seq_id: int, data: list[gradwire.Datum]) -> pb.ForwardBackwardRequest:
    """A cross_entropy ForwardBackwardRequest as any gRPC client would build it."""
    return pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy",
                                     data=[_convert.datum_to_proto(d) for d in data])


def random_data(seed: int, lengths=(9, 14, 5, 12), vocab: int = 320) -> list[gradwire.Datum]:
    """Next-token datums of random tokens and weights, of different lengths."""
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        seq = rng.integers(0, vocab, size=n + 1)
        data.append(gradwire.Datum(
            model_input=gradwire.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:],
                            "weights": rng.uniform(0.0, 1.0, size=n).astype(np.float32)}))
    return data


def trained_run(service, rank: int = 4, seed: int = 0):
    """A run after one optimizer step, so both LoRA factors are non-zero."""
    tc = service.create_lora_training_client("tiny-random", rank=rank, seed=seed)
    tc.forward_backward(random_data(100), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    return tc


@contextlib.contextmanager
def sender_held(tc):
    """Keeps the training client's sender busy until the block ends, so the requests
    made inside it are all queued before any of them is sent. The holding request
    is a custom loss of exactly zero gradient: it changes no weight or gradient."""
    gate = threading.Event()

    def wait_for_gate(data, logprobs):
        gate.wait()
        return (logprobs[0] * 0.0).sum(), {}

    holder = tc.forward_backward_custom(random_data(99, lengths=(3,)), wait_for_gate)
    try:
        yield
    finally:
        gate.set()
    holder.result()


def wait_operation(operations, name: str, seconds: float = 30) -> operations_pb2.Operation:
    """One WaitOperation long-poll of at most `seconds`."""
    return operations.WaitOperation(operations_pb2.WaitOperationRequest(
        name=name, timeout=duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))))


def finished(operations, name: str) -> operations_pb2.Operation:
    operation = wait_operation(operations, name)
    assert operation.done, f"{name} is not done after 30 s"
    return operation


def succeeded(operations, name: str) -> operations_pb2.Operation:
    """The finished operation, which must hold no error."""
    operation = finished(operations, name)
    assert not operation.HasField("error"), operation.error
    return operation


def operation_metadata(operation: operations_pb2.Operation) -> pb.OperationMetadata:
    meta = pb.OperationMetadata()
    operation.metadata.Unpack(meta)
    return meta


def response_or_error(method, request):
    """What a raw stub's call returns, or the grpc.RpcError it raises."""
    try:
        return method(request)
    except grpc.RpcError as error:
        return error


def stream_operations(operations, run_id: str) -> list[operations_pb2.Operation]:
    """The run's operations of client-streamed requests."""
    listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name=f"operations/{run_id}/"))
    return [op for op in listed.operations if "Stream" in operation_metadata(op).kind]


def wait_for_stream_operation(operations, run_id: str, received: int, seconds: float = 30) -> str:
    """The name of the run's streamed request's operation, once the server has received
    `received` datums of it."""
    deadline = time.monotonic() + seconds
    while True:
        for op in stream_operations(operations, run_id):
            if operation_metadata(op).num_datums >= received:
                return op.name
        assert time.monotonic() < deadline, "the stream never reached the server"
        time.sleep(0.02)


@contextlib.contextmanager
def engine_setting(server, name: str, value):
    """Sets the server engine's attribute `name` (on its worker) while the block runs."""
    engine = server.engine
    before = getattr(engine, name)
    server.call(lambda: setattr(engine, name, value))
    try:
        yield
    finally:
        server.call(lambda: setattr(engine, name, before))


@contextlib.contextmanager
def forwards_held(server):
    """Holds every training forward pass of the server at its start until the block ends;
    yields the event set once one is held (a request's turn is being computed)."""
    holding, release = threading.Event(), threading.Event()

    def hold(*shape: int) -> None:
        holding.set()
        release.wait(60)

    with engine_setting(server, "before_forward", hold):
        try:
            yield holding
        finally:
            release.set()


@contextlib.contextmanager
def worker_busy(server):
    """Keeps the server's worker thread occupied until the block ends, so requests
    made inside it stay queued."""
    running, release = threading.Event(), threading.Event()

    def occupy() -> None:
        running.set()
        release.wait()

    blocker = threading.Thread(target=server.call, args=(occupy,))
    blocker.start()
    running.wait()
    try:
        yield
    finally:
        release.set()
        blocker.join()


@contextlib.contextmanager
def forward_batches(server):
    """Records the batch size of every forward pass of the server's base model's decoder
    (training runs the decoder, then unembeds in chunks)."""
    sizes: list[int] = []

    def record(module, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])

    decoder = server.engine.base.model.get_decoder()
    handle = server.call(lambda: decoder.register_forward_pre_hook(record, with_kwargs=True))
    try:
        yield sizes
    finally:
        server.call(handle.remove)


@contextlib.contextmanager
def decode_batches(server):
    """Records the rows of every decode step of the server's sampler (eager or a
    CUDA graph's replay, which no module hook sees)."""
    rows: list[int] = []

    def recording(decode_logits):
        def record(tokens):
            rows.append(tokens.shape[0])
            return decode_logits(tokens)
        return record

    with decode_steps_wrapped(server, recording):
        yield rows


@contextlib.contextmanager
def decode_steps_wrapped(server, wrap):
    """The sampler's decode step (DecodeLoop._decode_logits) replaced by wrap(the step as it
    was) while the block runs; such blocks nest."""
    loop = server.server.sampling.loop
    own, before = "_decode_logits" in vars(loop), loop._decode_logits
    server.call(lambda: setattr(loop, "_decode_logits", wrap(before)))
    try:
        yield
    finally:
        server.call(lambda: setattr(loop, "_decode_logits", before) if own else delattr(loop, "_decode_logits"))


@contextlib.contextmanager
def arriving_while_decoding(server, submit):
    """While the block runs, the decode loop's first decode step calls submit() (on the
    worker), so that request joins a batch that is decoding; yields the list that gets
    submit()'s result (a future, an operation's name)."""
    submitted = []

    def submitting(decode_logits):
        def submit_then_decode(tokens):
            if not submitted:
                submitted.append(submit())
            return decode_logits(tokens)
        return submit_then_decode

    with decode_steps_wrapped(server, submitting):
        yield submitted


@contextlib.contextmanager
def micro_batch_tokens(server, tokens: int):
    """The server's micro-batch size set to `tokens` until the block ends."""
    engine = server.engine
    before = engine.micro_batch_tokens
    server.call(lambda: setattr(engine, "micro_batch_tokens", tokens))
    try:
        yield
    finally:
        server.call(lambda: setattr(engine, "micro_batch_tokens", before))
