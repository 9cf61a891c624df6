"""temperature, top_k and top_p do what they say: every sampled token lies in the
top-k set / nucleus computed from in-process reference logits at its step (same
weights, full recompute, no KV cache), a temperature near 0 gives the greedy
tokens, and the sampled tokens follow softmax(logits / T) for each T. Fixed
seeds throughout: the outcome is the same on every run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwire
from gradwire_server.models import tiny_random_model

PROMPT = [72, 101, 108, 108, 111, 44, 32]
# tiny-random's logits are nearly flat (std ~0.16): a float32 rounding difference between the
# server's KV-cache decode and the reference recompute is far below any gap that matters here.
SLACK = 1e-4


@pytest.fixture(scope="module")
def base_sampler(service):
    return service.create_sampling_client(base_model="tiny-random")


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


def sample(client, num_samples: int, **params) -> list[list[int]]:
    response = client.sample(gradwire.ModelInput.from_ints(PROMPT), num_samples,
                             gradwire.SamplingParams(**params)).result()
    return [s.tokens for s in response.sequences]


@torch.no_grad()
def step_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: the reference logits that chose each sampled token (one causal pass)."""
    logits = model(input_ids=torch.tensor([PROMPT + tokens])).logits[0].double()
    return logits[len(PROMPT) - 1:len(PROMPT) - 1 + len(tokens)]


def allowed_mass_before(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Per token of each row: the probability mass of the tokens ranked strictly above it
    in softmax(logits / T) restricted to the top k, renormalised (inf outside the top k).
    A token is in the nucleus when that mass is below top_p."""
    scores = logits / temperature
    if top_k > 0:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth - SLACK / temperature, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered
    before = before.masked_fill(ordered == 0, float("inf"))
    return torch.empty_like(before).scatter(-1, order, before)


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_p=0.1),
    dict(temperature=0.7, top_k=20, top_p=0.9),   # test_sampling.py's tempered case
    dict(temperature=2.0, top_k=40, top_p=0.2),
], ids=["top_k", "top_p", "tempered", "hot nucleus"])
def test_every_sampled_token_lies_in_the_reference_top_k_and_nucleus(base_sampler, model, params):
    """16 samples x 24 steps. The setting really removes tokens at every step (so a
    sampler ignoring it would draw outside the set), and sampling still varies."""
    sequences = sample(base_sampler, 16, max_tokens=24, seed=123, **params)
    allowed_sizes, seen = [], set()
    for tokens in sequences:
        assert len(tokens) == 24
        before = allowed_mass_before(step_logits(model, tokens), params["temperature"],
                                     params.get("top_k", 0), params.get("top_p", 1.0))
        chosen = before.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        bad = (chosen >= params.get("top_p", 1.0) + SLACK).nonzero()
        assert not len(bad), f"step {int(bad[0])}: token {tokens[int(bad[0])]} is outside the allowed set"
        allowed_sizes += (before < params.get("top_p", 1.0)).sum(-1).tolist()
        seen.update(tokens)
    assert max(allowed_sizes) < 320  # the setting removes tokens at every step...
    assert len(seen) > 2  # ...and sampling still draws from the rest


def test_temperature_near_zero_gives_the_greedy_tokens(base_sampler, model):
    """Every seed gives the argmax tokens at T = 1e-5 (the reference's top-2 gaps divided by
    T are large enough that anything else has probability below e^-30)."""
    with torch.no_grad():
        ids = list(PROMPT)
        for _ in range(16):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(PROMPT):]
    top2 = step_logits(model, greedy).topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) / 1e-5 > 30
    for seed in (0, 1, 2):
        assert sample(base_sampler, 4, max_tokens=16, seed=seed, temperature=1e-5) == [greedy] * 4


def test_sampled_tokens_follow_the_tempered_distribution(base_sampler, model):
    """The first sampled token's mean reference logprob over 1,024 draws matches its
    expectation under softmax(logits / T) within 4 standard errors, for each T; the
    expectations for different T lie many standard errors apart (so one temperature
    cannot pass for another), and a higher T spreads the draws over more tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0, -1].double()
    logprobs = torch.log_softmax(logits, -1)
    draws, expectations, distinct = 1024, {}, {}
    for temperature in (0.02, 0.05, 0.2):
        p = torch.softmax(logits / temperature, -1)
        mean = float((p * logprobs).sum())
        sd = float(((p * logprobs ** 2).sum() - mean ** 2).sqrt())
        first = [s[0] for seed in (5, 6, 7, 8) for s in sample(base_sampler, draws // 4, max_tokens=1,
                                                                seed=seed, temperature=temperature)]
        got = float(logprobs[first].mean())
        standard_error = sd / np.sqrt(draws)
        assert abs(got - mean) < 4 * standard_error, (temperature, got, mean, standard_error)
        expectations[temperature] = (mean, standard_error)
        distinct[temperature] = len(set(first))
    (m1, e1), (m2, e2), (m3, e3) = expectations.values()
    assert m1 - m2 > 10 * max(e1, e2) and m2 - m3 > 10 * max(e2, e3)
    assert distinct[0.02] < distinct[0.05] < distinct[0.2]


def test_a_response_too_large_for_one_message_is_refused_naming_num_samples(base_sampler):
    """256 samples of up to 1000 tokens with 20 top-k logprobs each (43 MB) cannot ride in one
    Operation: INVALID_ARGUMENT naming num_samples, without pointing to SampleStream (which
    carries no top-k logprobs)."""
    prompt = gradwire.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(gradwire.BadRequestError, match="num_samples: 256 samples of up to 1000 tokens") as raised:
        base_sampler.sample(prompt, 256, gradwire.SamplingParams(max_tokens=1000), topk_sample_logprobs=20).result()
    assert "SampleStream" not in str(raised.value)
