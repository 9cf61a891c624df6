"""Token generation, nanoGPT-style: one prefill pass over the prompt, then a
decode loop that feeds one token per sample through the KV cache.

The num_samples completions of a request decode together as one batch (the
prompt is prefilled once and its cache repeated); a finished sample's row
leaves the batch. Each request draws from its own torch.Generator seeded from
`seed`, so the same seed gives the same tokens and nothing touches the global
RNG.

A sampled token's logprob is log_softmax of the model's *unscaled* logits at
that token: exactly what the training side computes for the same tokens (RL
losses compare the two), not the temperature / top-k / top-p distribution the
token was drawn from.

Runs on the worker thread; knows nothing about gRPC or adapters (the caller
passes the model to call).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

TOPK_MASK_LOGPROB = -99999.0  # fills top-k rows that have no prediction (Tinker's sentinel)


@dataclass
class SamplingSettings:
    """Validated SamplingParams."""

    max_tokens: int
    seed: int
    temperature: float = 1.0   # 0: greedy
    top_k: int = 0             # <= 0: off
    top_p: float = 1.0         # 1: off
    stop_strings: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()


@dataclass
class SampleSpec:
    """A validated sampling request: prompt token ids [L] and what to compute."""

    prompt: np.ndarray
    num_samples: int           # 0: prompt logprobs only
    settings: SamplingSettings
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0             # k most likely tokens at each generated position
    prompt_logprobs_last_n: int | None = None  # score only the prompt's last n positions


@dataclass
class PromptScores:
    """Prompt logprobs [L] (entry 0 NaN) and top-k ids / logprobs [L, k] (row 0 masked)."""

    logprobs: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


@dataclass
class SequenceNews:
    """What one sample generated since the last report."""

    index: int
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str | None   # "stop" | "length" once finished


@dataclass
class _Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (ids [k], logprobs [k]) per token
    reported: int = 0
    done_reported: bool = False


class Generation:
    """One request's generation: prefill(), then decode() a few steps at a time
    until done. Keeps its KV cache between calls, so other work can use the
    model in between (with whatever adapter it needs)."""

    def __init__(self, spec: SampleSpec, device: torch.device, decode_text: Callable[[list[int]], str]):
        self.spec = spec
        self.settings = spec.settings
        self.device = device
        self.decode_text = decode_text
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(spec.settings.seed)
        self.sequences = [_Sequence() for _ in range(spec.num_samples)]
        self._rows: list[int] = list(range(spec.num_samples))  # cache row -> sample index
        self._cache = DynamicCache()
        self._next_logits: torch.Tensor | None = None         # [rows, V], float32
        self._longest_stop = max((len(s) for s in self.settings.stop_strings), default=0)

    @property
    def done(self) -> bool:
        return all(s.stop_reason is not None for s in self.sequences)

    @torch.no_grad()
    def prefill(self, model) -> PromptScores:
        """Runs the prompt through the model; returns the prompt's scores if asked for."""
        prompt = torch.from_numpy(self.spec.prompt).to(self.device)[None]
        want_scores = self.spec.prompt_logprobs or self.spec.topk_prompt_logprobs > 0
        # Only the last position's logits are needed unless the prompt is scored.
        logits = model(input_ids=prompt, cache=self._cache, use_cache=True,
                       logits_to_keep=0 if want_scores else 1).logits[0].float()   # [L or 1, V]
        scores = _prompt_scores(logits, prompt[0], self.spec) if want_scores else PromptScores()
        if self.sequences:
            self._cache.batch_repeat_interleave(len(self.sequences))
            # A copy, so the prompt's [L, V] logits are freed now, not after the last token.
            self._next_logits = logits[-1:].expand(len(self.sequences), -1).clone()
        return scores

    @torch.no_grad()
    def decode(self, model, steps: int) -> None:
        """Generates up to `steps` more tokens per unfinished sample."""
        for _ in range(steps):
            if self.done:
                return
            tokens, logprobs = choose_tokens(self._next_logits, self.settings, self.generator)
            keep = self._record(tokens.tolist(), logprobs.tolist(),
                                _top_logprobs(self._next_logits, self.spec.topk_sample_logprobs))
            if not keep:
                return
            if len(keep) < len(self._rows):
                index = torch.tensor(keep, device=self.device)
                self._cache.batch_select_indices(index)
                tokens = tokens[index]
                self._rows = [self._rows[k] for k in keep]
            self._next_logits = model(input_ids=tokens[:, None], cache=self._cache,
                                      use_cache=True).logits[:, -1].float()

    def _record(self, tokens: list[int], logprobs: list[float],
                top: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
        """Appends each row's token (and its top-k row); returns the rows still generating."""
        keep = []
        for row, (token, logprob) in enumerate(zip(tokens, logprobs)):
            sequence = self.sequences[self._rows[row]]
            sequence.tokens.append(token)
            sequence.logprobs.append(logprob)
            if top is not None:
                sequence.topk.append((top[0][row], top[1][row]))
            if token in self.settings.stop_tokens or self._hit_stop_string(sequence.tokens):
                sequence.stop_reason = "stop"
            elif len(sequence.tokens) >= self.settings.max_tokens:
                sequence.stop_reason = "length"
            else:
                keep.append(row)
        return keep

    def _hit_stop_string(self, tokens: list[int]) -> bool:
        """Whether the decoded completion now contains a stop string. Every
        earlier token was checked, so only a match that the newest token
        completes is new, and it lies within the last (longest stop + newest
        token's text) characters: decode a tail of tokens that long, doubling
        it while it is shorter (some tokens decode to little or nothing)."""
        if not self._longest_stop:
            return False
        need = self._longest_stop + len(self.decode_text(tokens[-1:])) + 1
        count = self._longest_stop + 1
        while True:
            tail = self.decode_text(tokens[-count:])
            if len(tail) >= need or count >= len(tokens):
                return any(stop in tail for stop in self.settings.stop_strings)
            count *= 2

    def news(self) -> list[SequenceNews]:
        """Per sample, the tokens generated (and whether it ended) since the last call."""
        out = []
        for index, sequence in enumerate(self.sequences):
            finished = sequence.stop_reason is not None and not sequence.done_reported
            if len(sequence.tokens) > sequence.reported or finished:
                out.append(SequenceNews(index, sequence.tokens[sequence.reported:],
                                        sequence.logprobs[sequence.reported:],
                                        sequence.stop_reason))
                sequence.reported = len(sequence.tokens)
                sequence.done_reported = sequence.stop_reason is not None
        return out


def choose_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks one token per row of logits [B, V]; returns (tokens [B], their unscaled logprobs [B])."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if settings.temperature == 0:
        chosen = logits.argmax(dim=-1)
    else:
        scores = logits / settings.temperature
        if 0 < settings.top_k < scores.shape[-1]:
            kth = torch.topk(scores, settings.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if settings.top_p < 1.0:
            scores = _nucleus(scores, settings.top_p)
        chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
    return chosen, logprobs.gather(-1, chosen[:, None])[:, 0]


def _top_logprobs(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The k most likely tokens of each row of logits [B, V] and their unscaled logprobs
    (ids [B, k], logprobs [B, k]); None when k is 0."""
    if k <= 0:
        return None
    top = torch.topk(torch.log_softmax(logits, dim=-1), min(k, logits.shape[-1]), dim=-1)
    return top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy()


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Masks all but the most likely tokens whose probabilities first reach top_p
    (the most likely token always stays)."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    ordered = ordered.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)


def _prompt_scores(logits: torch.Tensor, prompt: torch.Tensor, spec: SampleSpec) -> PromptScores:
    """Position i's logits predict prompt token i + 1; token 0 has no prediction."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)                     # [L-1, V]
    scores = PromptScores()
    if spec.prompt_logprobs:
        chosen = logprobs.gather(-1, prompt[1:, None])[:, 0].cpu().numpy()
        scores.logprobs = np.concatenate([[np.nan], chosen]).astype(np.float32)
    k = min(spec.topk_prompt_logprobs, logprobs.shape[-1])
    if k > 0:
        top = torch.topk(logprobs, k, dim=-1)
        ids = np.zeros((len(prompt), k), dtype=np.int32)
        values = np.full((len(prompt), k), TOPK_MASK_LOGPROB, dtype=np.float32)
        ids[1:] = top.indices.cpu().numpy()
        values[1:] = top.values.cpu().numpy()
        scores.topk_ids, scores.topk_logprobs = ids, values
    if spec.prompt_logprobs_last_n is not None:  # positions before the last n are not scored
        hidden = max(len(prompt) - spec.prompt_logprobs_last_n, 0)
        if scores.logprobs is not None:
            scores.logprobs[:hidden] = np.nan
        if scores.topk_ids is not None:
            scores.topk_ids[:hidden], scores.topk_logprobs[:hidden] = 0, TOPK_MASK_LOGPROB
    return scores
