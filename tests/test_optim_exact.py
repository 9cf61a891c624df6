"""optim_step against torch on copies of the run's tensors: grad_clip_norm is
clip_grad_norm_ then AdamW, and the returned grad_norm:mean / learning_rate:mean
are the values the user asked about. Limits at their exact boundaries: the
model's context length and the largest LoRA rank."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import gradwire
from reference import assert_state_equal, random_data, run_state, sender_held, server_gradients, trained_run


def reference_step(state: dict, adam: gradwire.AdamParams, optimizer: torch.optim.AdamW | None = None,
                   params: list[torch.nn.Parameter] | None = None):
    """One step of torch's clip_grad_norm_ + AdamW on copies of the run's weights and grads
    (the same optimizer object carries over between steps). Returns (params, optimizer,
    the total gradient norm before clipping)."""
    if params is None:
        params = [torch.nn.Parameter(weight.clone()) for weight, _ in state.values()]
    with torch.no_grad():
        for p, (weight, grad) in zip(params, state.values()):
            p.copy_(weight)
            p.grad = None if grad is None else grad.clone()
    if optimizer is None:
        # The server's implementation on each device: fused on CUDA, one parameter at a time on the CPU.
        optimizer = torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2),
                                      eps=adam.eps, weight_decay=adam.weight_decay,
                                      **({"fused": True} if params[0].is_cuda else {"foreach": False}))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                 if p.grad is not None]))
    if adam.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
    optimizer.step()
    return params, optimizer, float(norm)


def assert_weights_close(params, state: dict) -> None:
    for p, (weight, grad) in zip(params, state.values()):
        torch.testing.assert_close(weight, p.detach(), rtol=1e-6, atol=1e-9)
        assert grad is None


def test_grad_clip_norm_is_clip_grad_norm_then_adamw(server, service):
    """Three steps, clipped by factors of very different size (Adam is nearly invariant to
    one constant scale of the gradient, so only a changing factor shows whether clipping
    happened); eps is large enough that the gradient's scale reaches the update. The
    weights after each step equal torch's, and grad_norm:mean is the norm before clipping."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=21)
    adam = gradwire.AdamParams(learning_rate=1e-2, eps=1e-3, grad_clip_norm=0.5)
    params = optimizer = None
    clipped = []
    for step, seed in enumerate((1, 2, 3)):
        data = random_data(seed, lengths=(9, 14, 5, 12) if step != 1 else (40, 40, 40, 40))
        tc.forward_backward(data, "cross_entropy").result()
        before = run_state(server, tc.model_id)
        params, optimizer, norm = reference_step(before, adam, optimizer, params)
        metrics = tc.optim_step(adam).result().metrics
        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-6)
        assert metrics["learning_rate:mean"] == adam.learning_rate
        clipped.append(norm / adam.grad_clip_norm)
        assert_weights_close(params, run_state(server, tc.model_id))
    assert min(clipped) > 1.5 and max(clipped) / min(clipped) > 1.5  # really clipped, by varying factors


def test_clipping_makes_a_difference_the_test_can_see(server, service):
    """The same gradient stepped without clipping gives other weights: the test above
    would notice a server that ignores grad_clip_norm."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=22)
    tc.forward_backward(random_data(4), "cross_entropy").result()
    state = run_state(server, tc.model_id)
    clip = gradwire.AdamParams(learning_rate=1e-2, eps=1e-3, grad_clip_norm=0.1)
    no_clip = gradwire.AdamParams(learning_rate=1e-2, eps=1e-3)
    with_clip, _, _ = reference_step(state, clip)
    without, _, _ = reference_step(state, no_clip)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(with_clip, without)) > 1e-4
    tc.optim_step(clip).result()
    assert_weights_close(with_clip, run_state(server, tc.model_id))


def test_grad_norm_and_learning_rate_metrics_are_the_values(server, service):
    """No clipping: grad_norm:mean is the global L2 norm of the accumulated gradient and
    learning_rate:mean the learning rate given; an optim_step with no gradient reports 0."""
    tc = trained_run(service, seed=23)
    tc.forward_backward(random_data(5), "cross_entropy")
    tc.forward_backward(random_data(6), "cross_entropy").result()
    grads = server_gradients(server, tc.model_id)
    expected = float(torch.cat([g.reshape(-1).double() for g in grads.values()]).norm())
    metrics = tc.optim_step(gradwire.AdamParams(learning_rate=3.5e-3)).result().metrics
    assert metrics["grad_norm:mean"] == pytest.approx(expected, rel=1e-6)
    assert metrics["learning_rate:mean"] == pytest.approx(3.5e-3, rel=1e-12)
    assert tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"] == 0.0


# ---- the model's context -----------------------------------------------------------------------

def long_datum(length: int, seed: int = 0) -> gradwire.Datum:
    rng = np.random.default_rng(seed)
    return gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, length)),
                          loss_fn_inputs={"target_tokens": rng.integers(0, 320, length)})


@pytest.mark.parametrize("forward_only", [False, True], ids=["forward_backward", "forward"])
def test_a_datum_longer_than_the_context_is_invalid_and_changes_nothing(server, service, forward_only):
    """tiny-random's context is 1,024 tokens: a 1,025-token datum (here the second) is
    INVALID_ARGUMENT naming data[1].model_input, nothing changes, and the optim_step
    queued behind it is aborted."""
    tc = trained_run(service, seed=24)
    tc.forward_backward(random_data(7), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    with sender_held(tc):
        call = tc.forward if forward_only else tc.forward_backward
        rejected = call([long_datum(10), long_datum(1025, seed=1)], "cross_entropy")
        step = tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    with pytest.raises(gradwire.BadRequestError) as raised:
        rejected.result()
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("data[1].model_input", "1025 tokens exceed the model's context of 1024") in \
        raised.value.field_violations
    with pytest.raises(gradwire.AbortedError):
        step.result()
    assert_state_equal(before, run_state(server, tc.model_id))


def test_a_datum_of_exactly_the_context_trains(server, service):
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=25)
    out = tc.forward_backward([long_datum(1024, seed=2)], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].shape == (1024,)
    assert server_gradients(server, tc.model_id)


# ---- LoRA rank -----------------------------------------------------------------------------------

def test_the_largest_lora_rank_is_accepted_and_one_more_rejected(server, service):
    """max_lora_rank is 256 (as advertised in the capabilities): rank 256 creates a run whose
    adapter has rank 256; rank 257 is INVALID_ARGUMENT naming lora_config.rank and creates nothing."""
    assert service.get_server_capabilities().limits["max_lora_rank"] == 256
    tc = service.create_lora_training_client("tiny-random", rank=256, seed=0, train_mlp=False,
                                             train_unembed=False)
    assert tc.get_info().lora_rank == 256
    shapes = {tuple(w.shape) for name, (w, _) in run_state(server, tc.model_id).items() if "lora_A" in name}
    assert {shape[0] for shape in shapes} == {256}
    runs_before = set(server.engine.runs)
    with pytest.raises(gradwire.BadRequestError) as raised:
        service.create_lora_training_client("tiny-random", rank=257, seed=0)
    assert raised.value.field_violations == [("lora_config.rank", "must be in [1, 256], got 257")]
    assert set(server.engine.runs) == runs_before
    tc.unload().result()
