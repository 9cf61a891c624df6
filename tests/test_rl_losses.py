"""Built-in RL losses (importance_sampling, ppo, cispo, dro) over real gRPC: loss:sum and the
accumulated gradient equal a plain per-token implementation of each formula, written here,
over the in-process reference model's logprobs on identical weights. Bad input is rejected
naming the key and changes nothing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradwire
from reference import (assert_state_equal, forward_batches, micro_batch_tokens, random_data,
                       reference_gradients, reference_logprobs, reference_model, relative_error, run_state,
                       server_gradients, trained_run)

TOLERANCE = 1e-5  # relative, float32
DEFAULT_CLIPS = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0)}


def clip_range(loss_fn: str, config: dict[str, float]) -> tuple[float, float]:
    lo, hi = DEFAULT_CLIPS[loss_fn]
    return config.get("clip_low_threshold", lo), config.get("clip_high_threshold", hi)


def rl_data(model, seed: int, shapes, avoid=()) -> list[gradwire.Datum]:
    """Datums of random tokens (shapes: [N] or (N, K) targets per datum) whose sampler
    logprobs q put r = exp(lp - q) between 0.3 and 6, never within 2% of a value in
    `avoid` (the clip thresholds: float noise must not move a token across one).
    Advantages are normal, so both signs occur, but for the first two positions' (0, as a
    prompt's)."""
    rng = np.random.default_rng(seed)
    data = []
    for shape in shapes:
        n = shape if isinstance(shape, int) else shape[0]
        target_shape = (n,) if isinstance(shape, int) else shape
        datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, n)),
                               loss_fn_inputs={"target_tokens": rng.integers(0, 320, target_shape)})
        with torch.no_grad():
            lp = reference_logprobs(model, datum).numpy()
        ratio = np.exp(rng.uniform(math.log(0.3), math.log(6.0), target_shape))
        for threshold in avoid:
            near = np.abs(ratio - threshold) < 0.02 * max(threshold, 0.1)
            ratio[near] = threshold * 1.1 + 0.05
        datum.loss_fn_inputs["logprobs"] = gradwire.TensorData.from_numpy(
            (lp - np.log(ratio)).astype(np.float32))
        advantages = rng.normal(size=target_shape).astype(np.float32)
        advantages[:2] = 0  # prompt positions, as in an RL datum: trained on by no loss
        datum.loss_fn_inputs["advantages"] = gradwire.TensorData.from_numpy(advantages)
        data.append(datum)
    return data


def expected_loss(loss_fn: str, config: dict[str, float], lp: torch.Tensor, q: torch.Tensor,
                  advantages: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the loss, the number of trained tokens (nonzero advantage) whose ratio was clipped),
    token by token."""
    total, clipped = torch.zeros(()), 0
    for lp_t, q_t, a in zip(lp.reshape(-1), q.reshape(-1).tolist(), advantages.reshape(-1).tolist()):
        ratio = torch.exp(lp_t - q_t)
        r = ratio.item()
        if loss_fn == "importance_sampling":
            total = total - ratio * a
        elif loss_fn == "ppo":
            lo, hi = clip_range(loss_fn, config)
            clipped += a != 0 and not lo <= r <= hi
            if a >= 0 and r > hi:      # the clipped term is smaller: a constant, no gradient
                total = total - hi * a
            elif a < 0 and r < lo:
                total = total - lo * a
            else:
                total = total - ratio * a
        elif loss_fn == "cispo":
            lo, hi = clip_range(loss_fn, config)
            clipped += a != 0 and not lo <= r <= hi
            weight = min(max(r, lo), hi)  # a plain float: no gradient through the ratio
            total = total - weight * lp_t * a
        elif loss_fn == "dro":
            total = total - (lp_t * a - 0.5 * config["beta"] * (lp_t - q_t) ** 2)
    return total, clipped


CASES = [
    ("importance_sampling", {}, [7, 12, 4]),
    ("importance_sampling", {}, [(6, 3), (9, 3), (11, 3)]),  # multi-target [N, K]
    ("ppo", {}, [7, 12, 4]),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, [10, 5, 13]),
    ("cispo", {}, [7, 12, 4]),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}, [10, 5, 13]),
    ("dro", {"beta": 0.05}, [7, 12, 4]),
    ("dro", {"beta": 0.7}, [10, 5, 13]),
]


@pytest.mark.parametrize("seed, loss_fn, config, shapes", [(i, *case) for i, case in enumerate(CASES)],
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values())) or 'default'}"
                              f"{'-multi_target' if isinstance(c[2][0], tuple) else ''}" for c in CASES])
def test_loss_and_gradient_match_the_formula(server, service, seed, loss_fn, config, shapes):
    """A batch of datums of different lengths (padded together on the server): loss:sum,
    per-token logprobs, clip_fraction:mean and the accumulated LoRA gradient all equal the
    formula's, and clipping happens on some tokens (so the clipped branch is tested)."""
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    avoid = clip_range(loss_fn, config) if loss_fn in DEFAULT_CLIPS else ()
    data = rl_data(model, seed=seed, shapes=shapes, avoid=avoid)
    out = tc.forward_backward(data, loss_fn, config).result()

    loss, fractions, clipped_branches = torch.zeros(()), [], set()
    for datum, output in zip(data, out.loss_fn_outputs):
        lp = reference_logprobs(model, datum)
        inputs = {key: datum.loss_fn_inputs[key].to_torch() for key in ("logprobs", "advantages")}
        np.testing.assert_allclose(output["logprobs"].to_numpy(), lp.detach().numpy(), atol=1e-5)
        datum_loss, clipped = expected_loss(loss_fn, config, lp, inputs["logprobs"], inputs["advantages"])
        loss = loss + datum_loss
        fractions.append(clipped / max(int((inputs["advantages"] != 0).sum()), 1))
        if loss_fn == "ppo":
            lo, hi = clip_range(loss_fn, config)
            ratio = torch.exp(lp.detach() - inputs["logprobs"])
            a = inputs["advantages"]
            clipped_branches |= {name for name, where in [
                ("above, A>0 (clipped)", (ratio > hi) & (a >= 0)),
                ("below, A<0 (clipped)", (ratio < lo) & (a < 0)),
                ("above, A<0 (unclipped)", (ratio > hi) & (a < 0)),
                ("inside", (ratio >= lo) & (ratio <= hi))]
                if where.any()}
    assert out.metrics["loss:sum"] == pytest.approx(loss.item(), rel=TOLERANCE, abs=1e-4)
    if loss_fn in DEFAULT_CLIPS:
        assert sum(fractions) > 0, "no token was clipped: the clipped branch is untested"
        assert out.metrics["clip_fraction:mean"] == pytest.approx(np.mean(fractions), abs=1e-6)
    if loss_fn == "ppo":
        assert len(clipped_branches) == 4, clipped_branches
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= TOLERANCE


def test_micro_batches_merge_exactly(server, service):
    """One datum per micro-batch gives the same loss:sum, clip_fraction:mean and gradient as
    one micro-batch for all (the metrics merge by their reduction)."""
    whole = trained_run(service, seed=1)
    split = trained_run(service, seed=1)
    model = reference_model(server, whole.model_id, rank=4)
    data = rl_data(model, seed=7, shapes=[5, 11, 8], avoid=(0.8, 1.2))
    together = whole.forward_backward(data, "ppo").result()
    with micro_batch_tokens(server, 11), forward_batches(server) as batch_sizes:
        apart = split.forward_backward(data, "ppo").result()
    assert batch_sizes == [1, 1, 1]
    assert apart.metrics["loss:sum"] == pytest.approx(together.metrics["loss:sum"], rel=1e-6)
    assert apart.metrics["clip_fraction:mean"] == pytest.approx(together.metrics["clip_fraction:mean"],
                                                                rel=1e-6)
    grads_whole = server_gradients(server, whole.model_id)
    grads_split = {name.replace(split.model_id, whole.model_id): grad
                   for name, grad in server_gradients(server, split.model_id).items()}
    assert relative_error(grads_split, grads_whole) <= TOLERANCE


def test_capabilities_list_the_rl_losses(service):
    assert set(service.get_server_capabilities().loss_fns) == {
        "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"}


def gspo_data(model, sequence_ratios: list[float], prompt: int = 2) -> list[gradwire.Datum]:
    """One datum per target sequence ratio s: the first `prompt` positions are prompt (sampler
    logprob 0, advantage 0, outside sequence_ratio_mask); the others carry per-token log-ratios
    whose mean is log s, and one advantage per sequence (alternating sign)."""
    rng = np.random.default_rng(11)
    data = []
    for i, s in enumerate(sequence_ratios):
        n = 6 + 2 * i
        datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, n)),
                               loss_fn_inputs={"target_tokens": rng.integers(0, 320, n)})
        with torch.no_grad():
            lp = reference_logprobs(model, datum).numpy()
        noise = rng.normal(scale=0.3, size=n - prompt)
        log_ratio = math.log(s) + noise - noise.mean()
        q = np.concatenate([np.zeros(prompt), lp[prompt:] - log_ratio]).astype(np.float32)
        advantage = (1.0 + 0.5 * i) * (-1) ** i
        advantages = np.concatenate([np.zeros(prompt), np.full(n - prompt, advantage)]).astype(np.float32)
        mask = np.concatenate([np.zeros(prompt), np.ones(n - prompt)]).astype(np.float32)
        data.append(gradwire.Datum(datum.model_input, {**datum.loss_fn_inputs, "logprobs": q,
                                                       "advantages": advantages,
                                                       "sequence_ratio_mask": mask}))
    return data


def gspo_sequence_loss(lp: torch.Tensor, q: torch.Tensor, advantages: torch.Tensor, ratio_mask: torch.Tensor,
                       lo: float, hi: float) -> tuple[torch.Tensor, bool]:
    """One sequence's GSPO loss written as a plain loop: (loss, whether s was clipped)."""
    log_ratio_sum, count = torch.zeros(()), 0
    for lp_t, q_t, m in zip(lp, q.tolist(), ratio_mask.tolist()):
        if m:
            log_ratio_sum = log_ratio_sum + (lp_t - q_t)
            count += 1
    s = torch.exp(log_ratio_sum / count)
    total = torch.zeros(())
    for a in advantages.tolist():
        if a >= 0 and s.item() > hi:    # the clipped term is smaller: a constant, no gradient
            total = total - hi * a
        elif a < 0 and s.item() < lo:
            total = total - lo * a
        else:
            total = total - s * a
    return total, not lo <= s.item() <= hi


@pytest.mark.parametrize("config", [{}, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.25}],
                         ids=["paper-defaults", "wide"])
def test_gspo_loss_and_gradient_match_a_per_sequence_loop(server, service, config):
    """GSPO over real gRPC: loss:sum, clip_fraction:mean and the LoRA gradient equal a
    per-sequence loop over the reference model's logprobs. Sequences lie inside and on both
    sides of the clip range with both advantage signs, and prompt positions (outside
    sequence_ratio_mask, sampler logprob 0) do not enter the ratio."""
    lo = config.get("clip_low_threshold", 1 - 3e-4)
    hi = config.get("clip_high_threshold", 1 + 4e-4)
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    # s: far below (A>0), far above (A<0), inside, just outside in both directions.
    ratios = [0.5, 2.0, 1.0 + (hi - 1) / 4, 1.1, 0.9, 1.6]
    data = gspo_data(model, ratios)
    out = tc.forward_backward(data, "gspo", config).result()
    loss, clipped = torch.zeros(()), []
    for datum in data:
        inputs = {key: datum.loss_fn_inputs[key].to_torch()
                  for key in ("logprobs", "advantages", "sequence_ratio_mask")}
        datum_loss, was_clipped = gspo_sequence_loss(
            reference_logprobs(model, datum), inputs["logprobs"], inputs["advantages"],
            inputs["sequence_ratio_mask"], lo, hi)
        loss = loss + datum_loss
        clipped.append(was_clipped)
    assert 0 < sum(clipped) < len(clipped)
    assert out.metrics["loss:sum"] == pytest.approx(loss.item(), rel=TOLERANCE, abs=1e-4)
    assert out.metrics["clip_fraction:mean"] == pytest.approx(np.mean(clipped), abs=1e-6)
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= TOLERANCE


def test_gspo_datums_without_a_ratio_mask_use_every_token(server, service):
    """In one batch, a datum sent without sequence_ratio_mask is scored as it is alone
    and as the per-sequence loop with a ratio over all its tokens, beside a datum that sends one."""
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    with_mask, without = gspo_data(model, [1.1, 0.9])
    without = gradwire.Datum(without.model_input, {k: v for k, v in without.loss_fn_inputs.items()
                                                   if k != "sequence_ratio_mask"})
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    together = tc.forward([with_mask, without], "gspo", config).result().metrics["loss:sum"]
    apart = sum(tc.forward([d], "gspo", config).result().metrics["loss:sum"] for d in (with_mask, without))
    assert together == pytest.approx(apart, rel=1e-5)
    expected = torch.zeros(())
    for datum in (with_mask, without):
        inputs = {key: value.to_torch() for key, value in datum.loss_fn_inputs.items()}
        lp = reference_logprobs(model, datum)
        mask = inputs.get("sequence_ratio_mask", torch.ones(len(lp)))
        expected = expected + gspo_sequence_loss(lp, inputs["logprobs"], inputs["advantages"], mask, 0.5, 2.0)[0]
    assert together == pytest.approx(expected.item(), rel=1e-5)


def test_stable_reinforce_is_refused_with_the_reason(server, service):
    """Tinker has not published stable_reinforce's formula: the request is refused, saying
    so and naming the alternatives, and nothing changes."""
    tc = trained_run(service)
    tc.forward_backward(random_data(61), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    with pytest.raises(gradwire.BadRequestError) as raised:
        tc.forward_backward([rl_datum()], "stable_reinforce").result()
    assert "not published" in str(raised.value) and "importance_sampling" in str(raised.value)
    with pytest.raises(gradwire.BadRequestError, match="forward_backward_custom"):
        tc.forward_backward([rl_datum()], "custom").result()
    assert_state_equal(before, run_state(server, tc.model_id))


def rl_datum(n: int = 4, **overrides) -> gradwire.Datum:
    inputs = {"target_tokens": np.arange(1, n + 1), "logprobs": np.full(n, -1.0, np.float32),
              "advantages": np.linspace(-1, 1, n).astype(np.float32), **overrides}
    return gradwire.Datum(model_input=gradwire.ModelInput.from_ints(np.arange(2, n + 2)),
                          loss_fn_inputs={k: v for k, v in inputs.items() if v is not None})


# (case, data, loss_fn, loss_fn_config, the field named in the error, words in its description)
BAD_CASES = [
    ("unknown config key", [rl_datum()], "ppo", {"clip_threshold": 0.2},
     "loss_fn_config['clip_threshold']", "no config key"),
    ("config key of another loss", [rl_datum()], "importance_sampling", {"beta": 0.1},
     "loss_fn_config['beta']", "no config key"),
    ("missing advantages", [rl_datum(), rl_datum(advantages=None)], "importance_sampling", {},
     'data[1].loss_fn_inputs["advantages"]', "required"),
    ("missing sampler logprobs", [rl_datum(logprobs=None)], "dro", {"beta": 0.1},
     'data[0].loss_fn_inputs["logprobs"]', "required"),
    ("advantages too long", [rl_datum(advantages=np.zeros(5, np.float32))], "cispo", {},
     'data[0].loss_fn_inputs["advantages"]', "does not match the model input"),
    ("logprobs [N, K] for [N] targets", [rl_datum(logprobs=np.zeros((4, 2), np.float32))],
     "importance_sampling", {}, 'data[0].loss_fn_inputs["logprobs"]', "differs from target_tokens'"),
    ("multi-target ppo", [rl_datum(), rl_datum(target_tokens=np.ones((4, 2), np.int64),
                                               logprobs=np.zeros((4, 2), np.float32),
                                               advantages=np.zeros((4, 2), np.float32))],
     "ppo", {}, 'data[1].loss_fn_inputs["target_tokens"]', "one target per position"),
    ("nan advantage", [rl_datum(advantages=np.array([0, np.nan, 0, 0], np.float32))], "ppo", {},
     'data[0].loss_fn_inputs["advantages"]', "NaN"),
    ("infinite sampler logprob", [rl_datum(logprobs=np.array([-np.inf, 0, 0, 0], np.float32))],
     "importance_sampling", {}, 'data[0].loss_fn_inputs["logprobs"]', "infinity"),
    ("clip_low above clip_high", [rl_datum()], "ppo", {"clip_low_threshold": 1.3},
     "loss_fn_config['clip_low_threshold']", "exceeds clip_high_threshold 1.2"),
    ("negative clip_low", [rl_datum()], "cispo", {"clip_low_threshold": -0.1},
     "loss_fn_config['clip_low_threshold']", ">= 0"),
    ("negative beta", [rl_datum()], "dro", {"beta": -0.5}, "loss_fn_config['beta']", ">= 0"),
    ("missing beta", [rl_datum()], "dro", {}, "loss_fn_config['beta']", "required"),
    ("infinite beta", [rl_datum()], "dro", {"beta": math.inf}, "loss_fn_config['beta']", "finite"),
]


@pytest.mark.parametrize("case, data, loss_fn, config, field, words", BAD_CASES,
                         ids=[c[0] for c in BAD_CASES])
def test_bad_rl_input_is_rejected_and_changes_nothing(server, service, case, data, loss_fn, config,
                                                      field, words):
    tc = trained_run(service)
    tc.forward_backward(random_data(60), "cross_entropy").result()  # accumulated gradients to protect
    before = run_state(server, tc.model_id)
    with pytest.raises(gradwire.BadRequestError) as raised:
        tc.forward_backward(data, loss_fn, config).result()
    assert field in str(raised.value) and words in str(raised.value)
    assert any(f == field and words in d for f, d in raised.value.field_violations)
    assert_state_equal(before, run_state(server, tc.model_id))
    tc.forward([rl_datum()], "importance_sampling").result()  # the run stays usable
