"""forward_backward_custom: the gradient the model receives equals the custom
loss's true gradient through the model (in-process autograd, identical weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradwire
from reference import (assert_state_equal, random_data, reference_gradients, reference_logprobs,
                       reference_model, relative_error, run_state, sender_held, server_gradients,
                       trained_run)

TOLERANCE = 1e-5  # relative, float32


def logprob_squared_loss(data, logprobs):
    loss = (torch.cat(logprobs) ** 2).sum()
    return loss, {"logprob_squared_loss": loss.item()}


def variance_loss(data, logprobs):
    variance = torch.var(torch.cat(logprobs))
    return variance, {"variance_loss": variance.item()}


CORRECT = 1


def masked_ce_loss(data, logprobs_list):
    answer_logprobs = logprobs_list[0][-1]
    answer_logprobs = answer_logprobs - torch.logsumexp(answer_logprobs, dim=-1)
    loss = -answer_logprobs[CORRECT]
    return loss, {"masked_ce": loss.item()}


def bradley_terry_loss(data, logprobs):
    """Pairs (chosen, rejected) at (2i, 2i+1); reward = Σ logprob over the response
    mask, an extra loss input the server never sees."""
    rewards = torch.stack([(lp * d.loss_fn_inputs["response_mask"].to_torch()).sum()
                           for d, lp in zip(data, logprobs)])
    margin = rewards[0::2] - rewards[1::2]
    loss = -F.logsigmoid(margin).mean()
    return loss, {"bt_accuracy:mean": (margin > 0).float().mean().item()}


def multiple_choice_data():
    rng = np.random.default_rng(21)
    n = 15
    targets = np.zeros((n, 4), dtype=np.int64)
    targets[-1] = [32, 65, 66, 67]
    return [gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 256, n)),
                           loss_fn_inputs={"target_tokens": targets})]


def preference_data():
    rng = np.random.default_rng(22)
    data = []
    for n in (10, 12, 8, 9):
        seq = rng.integers(0, 320, n + 1)
        mask = (np.arange(n) >= n // 2).astype(np.float32)
        data.append(gradwire.Datum(model_input=gradwire.ModelInput.from_ints(seq[:-1]),
                                   loss_fn_inputs={"target_tokens": seq[1:], "response_mask": mask}))
    return data


CASES = {
    "logprob_squared": (logprob_squared_loss, lambda: random_data(30)),
    "variance": (variance_loss, lambda: random_data(31)),
    "masked_multiple_choice": (masked_ce_loss, multiple_choice_data),
    "bradley_terry": (bradley_terry_loss, preference_data),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_loss_gradient_is_exact(server, service, case):
    loss_fn, make_data = CASES[case]
    data = make_data()
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    out = tc.forward_backward_custom(data, loss_fn).result()

    logprobs = [reference_logprobs(model, d) for d in data]
    for lp in logprobs:
        lp.retain_grad()
    expected_loss, expected_metrics = loss_fn(data, logprobs)
    expected_loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= TOLERANCE
    # CUDA's float32 kernels round differently per batch shape, and the variance loss
    # (a difference of near-equal sums) magnifies that from ~1e-7 to ~1e-4.
    rel = 1e-5 if server.engine.device.type == "cpu" else 1e-4
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss.item(), rel=rel, abs=1e-6)
    # The surrogate cross-entropy with weights -dLoss/dlogprobs: Σ logprob · dLoss/dlogprob.
    surrogate = sum(float((lp.detach().double() * lp.grad.double()).sum()) for lp in logprobs)
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(surrogate, rel=rel, abs=1e-6)
    assert expected_metrics and all(out.metrics[key] == pytest.approx(value, rel=rel, abs=1e-6)
                                    for key, value in expected_metrics.items())
    for lp, output in zip(logprobs, out.loss_fn_outputs):
        np.testing.assert_allclose(output["logprobs"].to_numpy(), lp.detach().numpy(), rtol=0, atol=1e-5)


def test_extra_inputs_reach_the_loss_but_not_the_server(server, service):
    """A loss input the server does not know (response_mask) would be rejected by a
    built-in loss, yet forward_backward_custom hands it to the user's function only."""
    tc = trained_run(service)
    with pytest.raises(gradwire.BadRequestError, match="response_mask"):
        tc.forward_backward(preference_data(), "cross_entropy").result()
    seen = []

    def loss_fn(data, logprobs):
        seen.extend(d.loss_fn_inputs["response_mask"].to_numpy().sum() for d in data)
        return bradley_terry_loss(data, logprobs)

    tc.forward_backward_custom(preference_data(), loss_fn).result()
    assert len(seen) == 4 and all(s > 0 for s in seen)


@pytest.mark.parametrize("bad_loss, message", [
    (lambda data, lps: (_ for _ in ()).throw(ZeroDivisionError("boom")), "ZeroDivisionError: boom"),
    (lambda data, lps: (torch.cat(lps) ** 2, {}), "scalar"),
    (lambda data, lps: (torch.tensor(1.0), {}), "does not depend"),
    (lambda data, lps: (torch.tensor(1.0, requires_grad=True), {}), "does not depend"),
    (lambda data, lps: torch.cat(lps).sum(), r"\(loss, metrics\)"),
])
def test_bad_custom_loss_raises_and_changes_nothing(server, service, bad_loss, message):
    """A loss that raises or returns a non-scalar raises CustomLossError; no gradient is
    applied, and an optim_step queued behind it is aborted instead of stepping."""
    tc = trained_run(service)
    tc.forward_backward(random_data(40), "cross_entropy").result()
    before, operations = run_state(server, tc.model_id), set(server.server.store.names(f"operations/{tc.model_id}/"))
    with sender_held(tc):
        failing = tc.forward_backward_custom(random_data(41), bad_loss)
        step = tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    with pytest.raises(gradwire.CustomLossError, match=message):
        failing.result()
    with pytest.raises(gradwire.AbortedError):
        step.result()
    assert_state_equal(before, run_state(server, tc.model_id))
    # The run stays usable: later requests run normally.
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    assert tc.get_info().step == 2
    # No operation of its own is left: the failed forward leg's is gone too.
    assert not set(server.server.store.names(f"operations/{tc.model_id}/")) - operations


def test_a_custom_loss_call_leaves_no_operation_on_the_server(server, service):
    """Both legs' operations are deleted once read (the forward leg's after the backward leg
    is sent), so a long loop of custom losses keeps nothing on the server."""
    tc = trained_run(service)
    operations = set(server.server.store.names(f"operations/{tc.model_id}/"))
    for seed in (42, 43):
        tc.forward_backward_custom(random_data(seed), lambda data, lps: ((torch.cat(lps) ** 2).sum(), {})).result()
    assert not set(server.server.store.names(f"operations/{tc.model_id}/")) - operations
