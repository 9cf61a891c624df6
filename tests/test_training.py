"""forward / forward_backward / optim_step over real gRPC, checked against
in-process PyTorch on identical weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwire
from gradwire_server.engine import merge_metrics
from reference import (random_data, reference_gradients, reference_logprobs, reference_model,
                       relative_error, run_state, server_gradients, trained_run)


def test_forward_logprobs_and_loss_match_in_process(server, service):
    """Per-token logprobs and loss:sum equal in-process log_softmax on the same weights,
    and forward leaves gradients untouched."""
    tc = trained_run(service)
    data = random_data(1)
    out = tc.forward(data, "cross_entropy").result()
    model = reference_model(server, tc.model_id, rank=4)
    expected_loss = 0.0
    with torch.no_grad():
        for datum, output in zip(data, out.loss_fn_outputs):
            expected = reference_logprobs(model, datum)
            np.testing.assert_allclose(output["logprobs"].to_numpy(), expected.numpy(), atol=1e-5)
            expected_loss += float(-(expected * datum.loss_fn_inputs["weights"].to_torch()).sum())
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    assert server_gradients(server, tc.model_id) == {}


def test_forward_backward_gradient_matches_autograd(server, service):
    """The accumulated gradient equals autograd of Σ -logprob·weight in-process."""
    tc = trained_run(service)
    data = random_data(2)
    model = reference_model(server, tc.model_id, rank=4)
    tc.forward_backward(data, "cross_entropy").result()
    loss = sum(-(reference_logprobs(model, d) * d.loss_fn_inputs["weights"].to_torch()).sum()
               for d in data)
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5


def test_a_datum_without_weights_counts_each_token_once_beside_datums_with_them(server, service):
    """Weights default to 1 on every real token per datum, whatever the rest of the batch
    sends: a datum without them, batched with one that has them, adds Σ -logprob to the loss
    and gradient, as in-process autograd on the same weights does."""
    tc = trained_run(service)
    weighted, plain = random_data(5)[0], random_data(6)[0]
    plain = gradwire.Datum(model_input=plain.model_input,
                           loss_fn_inputs={"target_tokens": plain.loss_fn_inputs["target_tokens"]})
    model = reference_model(server, tc.model_id, rank=4)
    out = tc.forward_backward([weighted, plain], "cross_entropy").result()
    loss = (-(reference_logprobs(model, weighted) * weighted.loss_fn_inputs["weights"].to_torch()).sum()
            - reference_logprobs(model, plain).sum())
    loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-5)
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5


def test_gradients_accumulate_until_optim_step(server, service):
    """Two forward_backward calls accumulate the sum of both gradients; optim_step clears them."""
    tc = trained_run(service)
    first, second = random_data(3), random_data(4)
    model = reference_model(server, tc.model_id, rank=4)
    tc.forward_backward(first, "cross_entropy")
    tc.forward_backward(second, "cross_entropy").result()
    loss = sum(-(reference_logprobs(model, d) * d.loss_fn_inputs["weights"].to_torch()).sum()
               for d in first + second)
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5
    tc.optim_step(gradwire.AdamParams()).result()
    assert server_gradients(server, tc.model_id) == {}


def test_multi_target_tokens(server, service):
    """target_tokens [N, K] give the logprobs of K candidates per position (shape [N, K]),
    and the gradient of Σ -lp·w over them matches autograd; one batch may mix [N]
    and [N, K] datums of different K."""
    tc = trained_run(service)
    rng = np.random.default_rng(5)
    data = []
    for shape in ((6, 3), (11, 3), (7,), (5, 2)):
        n = shape[0]
        targets = rng.integers(0, 320, size=shape)
        weights = rng.uniform(0, 1, size=shape).astype(np.float32)
        data.append(gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, n)),
                                   loss_fn_inputs={"target_tokens": targets, "weights": weights}))
    model = reference_model(server, tc.model_id, rank=4)
    out = tc.forward_backward(data, "cross_entropy").result()
    loss = 0
    for datum, output in zip(data, out.loss_fn_outputs):
        expected = reference_logprobs(model, datum)
        assert output["logprobs"].shape == tuple(datum.loss_fn_inputs["target_tokens"].shape)
        np.testing.assert_allclose(output["logprobs"].to_numpy(), expected.detach().numpy(), atol=1e-5)
        loss = loss - (expected * datum.loss_fn_inputs["weights"].to_torch()).sum()
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5


def test_optim_step_matches_torch_adamw(server, service):
    """optim_step is torch AdamW (decoupled weight decay, the given betas/eps/lr) applied
    to the accumulated gradient, then the gradient is cleared."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=3)
    tc.forward_backward(random_data(6), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    params = [torch.nn.Parameter(weight.clone()) for weight, _ in before.values()]
    for p, (_, grad) in zip(params, before.values()):
        p.grad = grad.clone()
    adam = gradwire.AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)
    torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                      weight_decay=adam.weight_decay).step()
    tc.optim_step(adam).result()
    after = run_state(server, tc.model_id)
    for p, (weight, grad) in zip(params, after.values()):
        torch.testing.assert_close(weight, p.detach(), rtol=1e-6, atol=1e-8)
        assert grad is None


def test_pipelined_submission_equals_waiting(server, service):
    """forward_backward + optim_step submitted back to back give the same weights as
    waiting for each result in between (the server runs a run's requests in call order)."""
    pipelined = service.create_lora_training_client("tiny-random", rank=4, seed=7)
    waited = service.create_lora_training_client("tiny-random", rank=4, seed=7)
    adam = gradwire.AdamParams(learning_rate=1e-2)
    futures = []
    for step in range(3):
        futures.append(pipelined.forward_backward(random_data(10 + step), "cross_entropy"))
        futures.append(pipelined.optim_step(adam))
    for step in range(3):
        waited.forward_backward(random_data(10 + step), "cross_entropy").result()
        waited.optim_step(adam).result()
    [f.result() for f in futures]
    a, b = run_state(server, pipelined.model_id), run_state(server, waited.model_id)
    for (name_a, (wa, _)), (name_b, (wb, _)) in zip(sorted(a.items()), sorted(b.items())):
        assert name_a.replace(pipelined.model_id, "") == name_b.replace(waited.model_id, "")
        assert torch.equal(wa, wb), name_a
    assert pipelined.get_info().step == 3


def test_equal_seeds_give_equal_adapters_and_futures_await(server, service):
    """Runs created with the same seed start identical; the async twins double-await."""
    import asyncio

    first = service.create_lora_training_client("tiny-random", rank=4, seed=11)
    second = asyncio.run(service.create_lora_training_client_async("tiny-random", rank=4, seed=11))
    a, b = run_state(server, first.model_id), run_state(server, second.model_id)
    assert all(torch.equal(wa, wb) for (wa, _), (wb, _) in zip(a.values(), b.values()))

    async def loop():
        future = await second.forward_async(random_data(12), "cross_entropy")
        return await future

    out = asyncio.run(loop())
    expected = second.forward(random_data(12), "cross_entropy").result()  # the synchronous call
    assert out.metrics == expected.metrics
    assert len(out.loss_fn_outputs) == len(expected.loss_fn_outputs) == 4
    for got, want in zip(out.loss_fn_outputs, expected.loss_fn_outputs):
        np.testing.assert_array_equal(got["logprobs"].to_numpy(), want["logprobs"].to_numpy())


def test_a_cancelled_wait_for_an_async_call_leaves_the_client_working(server, service):
    """Cancelling the task that awaits optim_step_async (wait_for's timeout, a TaskGroup)
    while the request still waits in the send queue only stops the wait: the step keeps its
    place and runs, and the client's later calls are sent (before, the send thread died on
    the cancelled future and every later call waited forever)."""
    import asyncio

    tc = service.create_lora_training_client("tiny-random", rank=4, seed=13)
    queued = [tc.forward_backward(random_data(14), "cross_entropy") for _ in range(8)]

    async def impatient() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tc.optim_step_async(gradwire.AdamParams(learning_rate=1e-3)), 1e-3)
    asyncio.run(impatient())
    assert tc.forward(random_data(15), "cross_entropy").result(60).metrics["loss:sum"] > 0
    assert all(future.result(60).metrics["loss:sum"] > 0 for future in queued)
    assert tc.get_info().step == 1


def test_a_training_client_holds_no_thread_once_idle(server, service):
    """A training client's send thread ends once it has nothing to send, and a later call starts
    another: a loop that makes a client per step (a reference run, an eval) does not gain a thread
    per client."""
    import threading
    import time

    tc = service.create_lora_training_client("tiny-random", rank=2, seed=16)
    tc.forward(random_data(17), "cross_entropy").result()
    deadline = time.monotonic() + 30
    while any(t.name == f"gradwire-sender-{tc.model_id}" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the send thread outlived its queue"
        time.sleep(0.1)
    assert tc.forward(random_data(17), "cross_entropy").result(60).metrics["loss:sum"] > 0


def test_server_info_and_tokenizer(service):
    """Capabilities list the model, losses and limits; the tokenizer arrives offline with its chat template."""
    caps = service.get_server_capabilities()
    assert caps.supported_models[0].model_name == "tiny-random"
    assert "cross_entropy" in caps.loss_fns
    assert caps.limits["max_message_bytes"] == 4 * 1024 * 1024
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0, train_unembed=False)
    info = tc.get_info()
    assert (info.model_name, info.lora_rank, info.lora_config.train_unembed) == ("tiny-random", 2, False)
    tokenizer = tc.get_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                        add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_metrics_of_micro_batches_merge_by_their_reduction_suffix():
    """Sums add, max/min keep the extreme, means are weighted by datums (0-dim tensors)."""
    first = {"loss:sum": torch.tensor(1.5), "ratio:max": torch.tensor(1.0), "fraction:mean": torch.tensor(2.0)}
    second = {"loss:sum": torch.tensor(2.5), "ratio:max": torch.tensor(3.0), "fraction:mean": torch.tensor(4.0),
              "ratio:min": torch.tensor(0.5)}
    merged = merge_metrics(first, 1, second, 3)
    assert {key: float(value) for key, value in merged.items()} == {
        "loss:sum": 4.0, "ratio:max": 3.0, "fraction:mean": 3.5, "ratio:min": 0.5}
    assert float(merge_metrics(second, 3, {"ratio:min": torch.tensor(0.25)}, 1)["ratio:min"]) == 0.25
