"""Token generation for every request at once: one decode loop whose batch
holds the samples of all running requests (continuous batching).

A request that arrives while the loop decodes joins it before the next decode
step. Its prompt is prefilled in chunks of at most PREFILL_CHUNK_TOKENS between
decode steps (the chunks of several requests in one forward pass), so a long
prompt never stalls the running batch for long; its samples then join the
batch at the next step and each leaves it the step it finishes. Rows may use
different LoRA adapters (a sampler checkpoint, or none: the base model): see
lora_batch. Keys and values live in a paged block pool under a byte budget
(kv_cache); a request waits for admission until its worst case fits. On CUDA
decode steps replay CUDA graphs (decode_graphs).

Every sample draws from its own torch.Generator, seeded from the request's
`seed` and the sample's index, one uniform number per token (inverse-CDF
sampling), so its tokens do not depend on what else is in the batch and
nothing touches the global RNG.

A sampled token's logprob is log_softmax of the model's *unscaled* logits at
that token: what the training side computes for the same tokens (RL losses
compare the two), not the temperature / top-k / top-p distribution the token
was drawn from. Where they come from is the server's choice (--sampler-logprobs):
"decode", the logits of the decode step that drew the token (and the prefill's,
for the prompt); or "training", the training function (logprobs.model_target_logprobs)
run on each finished sample, prompt and tokens as one datum, with the sample's
adapter (with --compile through the compiled layers, as training): every logprob the
sampler returns (sampled tokens', their top-k rows, the prompt's) is then the number
forward returns for that datum alone, bit for bit.
They differ in rounding: a decode step is a one-row pass against cached keys,
training one causal pass (in bf16 on an H100, 1.1B model: up to 0.035). The
training pass costs one forward of each finished sample.

Runs on the worker thread; knows nothing about gRPC.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gradwire_server import compiled_layers, kv_cache, lora_batch
from gradwire_server.decode_graphs import DecodeGraphs
from gradwire_server.kv_cache import BLOCK_TOKENS, BlockPool, blocks_for
from gradwire_server.logprobs import model_target_and_top_logprobs, model_target_logprobs
from gradwire_server.lora_batch import AdapterWeights, StackedAdapters

TOPK_MASK_LOGPROB = -99999.0  # fills top-k rows that have no prediction (Tinker's sentinel)
DECODE_STEPS_PER_TURN = 16     # decode steps per scheduler turn: what a pending training request waits at most
PREFILL_CHUNK_TOKENS = 256     # prompt tokens per prefill forward pass
PREFILL_TOKENS_PER_STEP = 512  # prompt tokens prefilled between two decode steps while others decode
PREFILL_ROWS = 64              # requests prefilled together in one forward pass, at most
PREFILL_PASS_POSITIONS = 4096  # rows x longest chunk of one prefill pass (padding counts), at most
SAMPLER_LOGPROBS = ("auto", "training", "decode")  # gradwire-server --sampler-logprobs


def resolve_sampler_logprobs(choice: str, dtype: torch.dtype) -> str:
    """--sampler-logprobs as the loop takes it: auto is "training" over bf16 base weights
    (whose decode steps round differently from a training pass), else "decode"."""
    if choice == "auto":
        return "training" if dtype == torch.bfloat16 else "decode"
    return choice


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

    def worst_case_blocks(self, num_samples: int | None = None) -> int:
        """KV blocks of the worst case of `num_samples` samples (None: the request's): the
        prompt's full blocks (shared by the samples), and per sample the rest of the prompt
        and max_tokens; a prompt alone, its blocks."""
        samples = self.num_samples if num_samples is None else num_samples
        length = len(self.prompt)
        if not samples:
            return blocks_for(length)
        return length // BLOCK_TOKENS + samples * self.blocks_per_sample()

    def blocks_per_sample(self) -> int:
        """KV blocks one sample holds of its own: the rest of the prompt, and max_tokens."""
        length = len(self.prompt)
        return blocks_for(length + self.settings.max_tokens) - length // BLOCK_TOKENS


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
    logprobs: list[float]     # with training logprobs: none until the sample ends, then all of them
    stop_reason: str | None   # "stop" | "length" once finished


@dataclass
class _Sequence:
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (ids [k], logprobs [k]) per token
    reported: int = 0          # tokens reported by news()
    reported_logprobs: int = 0
    done_reported: bool = False
    blocks: list[int] = field(default_factory=list)  # KV block table
    length: int = 0                                   # tokens in the KV cache


def sequence_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded `seed` (decorrelated streams)."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0])


class Generation:
    """One request's generation, as the decode loop advances it. `adapter`: the
    LoRA factors its rows apply (None: the base model). `error`: set by the
    loop when the request cannot run (e.g. it can never fit the KV budget)."""

    def __init__(self, spec: SampleSpec, decode_text: Callable[[list[int]], str],
                 adapter: AdapterWeights | None = None):
        self.spec = spec
        self.settings = spec.settings
        self.decode_text = decode_text
        self.adapter = adapter
        self.sequences = [_Sequence(torch.Generator().manual_seed(sequence_seed(spec.settings.seed, i)))
                          for i in range(spec.num_samples)]
        self.scores = PromptScores()
        self.prefilled = 0                 # prompt tokens in the KV cache
        self.prompt_blocks: list[int] = []
        self.reservation = 0               # KV blocks reserved, not yet taken
        self.error: Exception | None = None
        # Per prefill chunk, when the prompt is scored from its prefill: the logprobs of the
        # prompt tokens it predicts and their top-k rows (ids, logprobs), as _chunk_scores gives.
        self.prompt_chunks: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]] = []
        self._longest_stop = max((len(s) for s in self.settings.stop_strings), default=0)

    @property
    def want_scores(self) -> bool:
        return self.spec.prompt_logprobs or self.spec.topk_prompt_logprobs > 0

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.spec.prompt)

    @property
    def done(self) -> bool:
        return self.prefill_done and all(s.stop_reason is not None for s in self.sequences)

    def take(self, pool: BlockPool) -> int:
        self.reservation -= 1
        return pool.take()

    def record(self, sequence: _Sequence, token: int, logprob: float | None,
               top: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """Appends a sampled token (and its logprob and top-k row, unless they come
        later); returns whether the sequence goes on."""
        sequence.tokens.append(token)
        if logprob is not None:
            sequence.logprobs.append(logprob)
        if top is not None:
            sequence.topk.append(top)
        if token in self.settings.stop_tokens or self._hit_stop_string(sequence.tokens):
            sequence.stop_reason = "stop"
        elif len(sequence.tokens) >= self.settings.max_tokens:
            sequence.stop_reason = "length"
        return sequence.stop_reason is None

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

    def release_sequence(self, pool: BlockPool, sequence: _Sequence) -> None:
        """Frees a finished sample's blocks and hands back its unused reservation."""
        own = len(sequence.blocks) - len(self.spec.prompt) // BLOCK_TOKENS
        unused = self.spec.blocks_per_sample() - own
        pool.release(sequence.blocks)
        sequence.blocks = []
        self.reservation -= unused
        pool.unreserve(unused)

    def release_all(self, pool: BlockPool) -> None:
        """Frees every block and reservation the request still holds."""
        pool.release(self.prompt_blocks)
        self.prompt_blocks = []
        for sequence in self.sequences:
            pool.release(sequence.blocks)
            sequence.blocks = []
        pool.unreserve(self.reservation)
        self.reservation = 0

    def news(self) -> list[SequenceNews]:
        """Per sample, the tokens generated (and whether it ended) since the last call."""
        out = []
        for index, sequence in enumerate(self.sequences):
            finished = sequence.stop_reason is not None and not sequence.done_reported
            if len(sequence.tokens) > sequence.reported or finished:
                out.append(SequenceNews(index, sequence.tokens[sequence.reported:],
                                        sequence.logprobs[sequence.reported_logprobs:],
                                        sequence.stop_reason))
                sequence.reported, sequence.reported_logprobs = len(sequence.tokens), len(sequence.logprobs)
                sequence.done_reported = sequence.stop_reason is not None
        return out


@dataclass
class KvCacheUsage:
    """The KV cache budget and use (GetServerCapabilities.kv_cache)."""

    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    block_tokens: int
    running_sequences: int
    waiting_requests: int


class DecodeLoop:
    """The running batch of every request's samples. `model`: the transformers
    causal LM (its peft adapter layers, if any, switched off by `base_weights`
    around each turn). Worker thread only."""

    def __init__(self, model: torch.nn.Module, pool: BlockPool, device: torch.device,
                 base_weights: Callable[[], contextlib.AbstractContextManager], graphs: str = "off",
                 logprobs_from: str = "decode", compiled: compiled_layers.CompiledLayers | None = None):
        """`graphs`: "captured" replays decode steps as CUDA graphs (decode_graphs);
        "uncaptured" runs the same padded static steps eagerly (how CPU tests check them).
        `logprobs_from`: "decode" or "training", where returned logprobs come from (module doc).
        `compiled`: training's compiled layers (--compile), which training passes then use."""
        self.model, self.pool, self.device = model, pool, device
        self.base_weights = base_weights
        self.logprobs_from = logprobs_from
        self.compiled = compiled
        # id(adapter) -> (the adapter, held so the id stays its own; its factors for the compiled layers)
        self._compiled_factors: dict[int, tuple[AdapterWeights, list]] = {}
        self._vocab_size = model.get_output_embeddings().weight.shape[0]
        attention = model.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"the sampler needs sdpa or eager attention, not {attention!r}")
        self._additive_mask = attention == "eager"
        self._linears = lora_batch.adaptable_linears(model)
        self.graphs = None if graphs == "off" else DecodeGraphs(model, self._linears, pool, device,
                                                                 self._additive_mask, capture=graphs == "captured")
        self._arrivals: deque[Callable[[], None]] = deque()  # joins of requests that arrived (any thread)
        self.waiting: deque[Generation] = deque()   # not admitted yet (KV budget)
        self.prefilling: list[Generation] = []
        self._rows: list[tuple[Generation, _Sequence]] = []
        self._logits: torch.Tensor | None = None     # [rows, V] float32: each row's next-token logits
        self._stacks: dict[tuple[int, ...], StackedAdapters] = {}
        self.turns = 0   # turns run
        self.steps = 0   # decode steps run

    def usage(self) -> KvCacheUsage:
        """The KV cache's budget and use now (read from any thread: plain counters)."""
        pool = self.pool
        return KvCacheUsage(budget_bytes=pool.budget_bytes, used_bytes=pool.used_bytes,
                            reserved_bytes=pool.reserved * pool.block_bytes, block_tokens=BLOCK_TOKENS,
                            running_sequences=len(self._rows), waiting_requests=len(self.waiting))

    def add(self, generation: Generation) -> None:
        self.waiting.append(generation)

    def remove(self, generation: Generation) -> None:
        """Drops a request (cancelled), freeing its KV blocks at once."""
        if generation in self.waiting:
            self.waiting.remove(generation)
        if generation in self.prefilling:
            self.prefilling.remove(generation)
        keep = [i for i, (g, _) in enumerate(self._rows) if g is not generation]
        if len(keep) < len(self._rows):
            self._select(keep)
        generation.release_all(self.pool)

    def arrive(self, join: Callable[[], None]) -> None:
        """Any thread: `join` (which adds a request and raises nothing) runs on the
        worker before the next decode step, so a request that arrives while the
        loop is decoding joins the batch then, not at the next turn."""
        self._arrivals.append(join)

    @torch.no_grad()
    def turn(self) -> None:
        """Admits what fits, prefills, and runs up to DECODE_STEPS_PER_TURN decode
        steps. A failure fails every request in the loop (their state is unknown)."""
        try:
            steps = 0
            while steps < DECODE_STEPS_PER_TURN:
                while self._arrivals:  # outside base_weights: a join may load an adapter
                    self._arrivals.popleft()()
                with self.base_weights():
                    while steps < DECODE_STEPS_PER_TURN and not self._arrivals:
                        steps += 1
                        self._admit()
                        self._prefill(PREFILL_TOKENS_PER_STEP if self._rows else None)
                        if self._rows:
                            self._decode_step()
                        elif not self.prefilling:
                            return
        except Exception as failure:
            for generation in [*self.waiting, *self.prefilling, *{id(g): g for g, _ in self._rows}.values()]:
                generation.error = failure
                generation.release_all(self.pool)
            self.waiting.clear()
            self.prefilling.clear()
            self._rows, self._logits = [], None
            raise
        finally:
            self.turns += 1

    def _admit(self) -> None:
        """Admits waiting requests in arrival order while their worst case fits (prompt-only
        requests scored by a training pass, which need no KV cache, at once)."""
        if self.logprobs_from == "training":  # whatever waits ahead of them
            for generation in [g for g in self.waiting if not self.uses_kv_cache(g.spec)]:
                self._score_prompt(generation)  # (still waiting: a failure of the loop reaches it)
                self.waiting.remove(generation)
                generation.prefilled = len(generation.spec.prompt)  # done: nothing left to prefill
        while self.waiting:
            generation = self.waiting[0]
            need = generation.spec.worst_case_blocks()
            if need > self.pool.usable_blocks:  # never admitted (the servicer refuses such requests): fails
                self.waiting.popleft()
                generation.error = ValueError(f"needs {need} KV blocks, more than the cache's "
                                              f"{self.pool.usable_blocks}")
                continue
            if not self.pool.reserve(need):
                return  # waits for running requests to free blocks
            generation.reservation = need
            self.prefilling.append(self.waiting.popleft())

    def _prefill(self, budget: int | None) -> None:
        """Prefills prompt chunks, oldest request first, up to `budget` tokens (None: all):
        the next chunk of several requests in one forward pass (a request whose prompt
        is scored, which needs every position's logits, in a pass of its own). A pass
        costs its rows x its longest chunk (left padding counts)."""
        while self.prefilling and (budget is None or budget > 0):
            limit = PREFILL_PASS_POSITIONS if budget is None else min(budget, PREFILL_PASS_POSITIONS)
            batch: list[tuple[Generation, int]] = []
            width = 0
            for generation in self.prefilling[:PREFILL_ROWS]:
                count = min(PREFILL_CHUNK_TOKENS, len(generation.spec.prompt) - generation.prefilled, limit)
                if batch and (self._scored_by_prefill(generation) or (len(batch) + 1) * max(width, count) > limit):
                    break
                batch.append((generation, count))
                width = max(width, count)
                if self._scored_by_prefill(generation):
                    break
            if budget is not None:
                budget -= len(batch) * width
            scored = self._scored_by_prefill(batch[0][0])
            tokens = np.zeros((len(batch), width), dtype=np.int64)  # left-padded (see kv_cache.Step)
            for row, (generation, count) in enumerate(batch):
                start = generation.prefilled
                while len(generation.prompt_blocks) * BLOCK_TOKENS < start + count:
                    generation.prompt_blocks.append(generation.take(self.pool))
                tokens[row, width - count:] = generation.spec.prompt[start:start + count]
            try:
                logits = self._forward(torch.from_numpy(tokens).to(self.device), [g.prompt_blocks for g, _ in batch],
                                       [g.prefilled for g, _ in batch], [c for _, c in batch],
                                       [g.adapter for g, _ in batch], keep=0 if scored else 1).float()
            except torch.OutOfMemoryError as error:  # fails this pass's requests alone: no other row was in it
                for generation, _ in batch:
                    generation.error = torch.OutOfMemoryError(
                        f"prefilling a pass of {len(batch)} prompt chunks x {width} tokens: {error}")
                    self.prefilling.remove(generation)
                    generation.release_all(self.pool)
                continue
            for row, (generation, count) in enumerate(batch):
                if scored:
                    self._score_prefill_chunk(generation, logits[0])
                generation.prefilled += count
                if generation.error is not None:
                    self.prefilling.remove(generation)
                    generation.release_all(self.pool)
                elif generation.prefill_done:
                    self._finish_prefill(generation, logits[row, -1:])
                    self.prefilling.remove(generation)

    def uses_kv_cache(self, spec: SampleSpec) -> bool:
        """Whether the request takes KV blocks: not a prompt alone scored by a training pass."""
        return bool(spec.num_samples) or self.logprobs_from == "decode"

    def _scored_by_prefill(self, generation: Generation) -> bool:
        """Whether the prompt's scores come from its prefill's logits (every position's)."""
        return generation.want_scores and self.logprobs_from == "decode"

    def _score_prefill_chunk(self, generation: Generation, logits: torch.Tensor) -> None:
        """Scores the prompt tokens that the chunk prefilled next predicts from its logits
        [C, V], so that a prompt's [L, V] logits are never held at once. Out of memory
        there fails its request alone (generation.error)."""
        prompt = generation.spec.prompt
        start = generation.prefilled
        targets = prompt[start + 1:start + 1 + len(logits)]  # the prompt's last position predicts none
        try:
            generation.prompt_chunks.append(_chunk_scores(logits[:len(targets)],
                                                          torch.from_numpy(targets).to(self.device),
                                                          generation.spec.topk_prompt_logprobs))
        except torch.OutOfMemoryError as error:
            generation.error = torch.OutOfMemoryError(
                f"scoring a prompt ({len(prompt)} tokens) from its prefill's logits: {error}")

    def _finish_prefill(self, generation: Generation, last_logits: torch.Tensor) -> None:
        """Scores the prompt if asked; hands each sample its block table (sharing
        the prompt's full blocks, copying its last partial one) and joins them."""
        prompt = generation.spec.prompt
        if self._scored_by_prefill(generation):
            chunks, generation.prompt_chunks = generation.prompt_chunks, []
            top = None
            if chunks[0][1] is not None:
                top = tuple(np.concatenate([chunk_top[i] for _, chunk_top in chunks]) for i in range(2))
            generation.scores = _prompt_scores(np.concatenate([logprobs for logprobs, _ in chunks]), top,
                                               generation.spec)
        elif generation.want_scores:
            self._score_prompt(generation)
        if not generation.sequences or generation.error is not None:
            generation.release_all(self.pool)
            return
        full, partial = divmod(len(prompt), BLOCK_TOKENS)
        shared = generation.prompt_blocks[:full]
        for index, sequence in enumerate(generation.sequences):
            sequence.blocks = list(shared)
            for block in shared:
                self.pool.share(block)
            if partial:
                if index == 0:
                    sequence.blocks.append(generation.prompt_blocks[full])
                else:
                    block = generation.take(self.pool)
                    self.pool.copy_block(generation.prompt_blocks[full], block, partial)
                    sequence.blocks.append(block)
            sequence.length = len(prompt)
        self.pool.release(shared)  # the prefill's own hold
        generation.prompt_blocks = []
        rows = [(generation, sequence) for sequence in generation.sequences]
        joining = last_logits.expand(len(rows), -1)
        self._logits = joining.clone() if self._logits is None else torch.cat([self._logits, joining])
        self._rows += rows

    def _decode_step(self) -> None:
        """Picks every row's next token; finished rows leave; the rest are fed through the model."""
        all_logprobs = torch.log_softmax(self._logits, dim=-1)
        tokens, logprobs = choose_tokens(self._logits, all_logprobs, [g.settings for g, _ in self._rows],
                                         [s.generator for _, s in self._rows])
        later = self.logprobs_from == "training"  # logprobs and top-k rows come once a sample ends
        tops = _top_logprobs(all_logprobs, [0 if later else g.spec.topk_sample_logprobs for g, _ in self._rows])
        keep = []
        for i, ((generation, sequence), token, logprob, top) in enumerate(
                zip(self._rows, tokens.tolist(), logprobs.tolist(), tops)):
            if generation.record(sequence, token, None if later else logprob, top):
                keep.append(i)
            else:
                generation.release_sequence(self.pool, sequence)
                if later and generation.error is None:
                    self._score_sample(generation, sequence)
        self.steps += 1
        failed = {id(g): g for g, _ in self._rows if g.error is not None}
        if failed:  # their rows leave; the other requests go on
            for generation in failed.values():
                generation.release_all(self.pool)
            keep = [i for i in keep if self._rows[i][0].error is None]
        if len(keep) < len(self._rows):
            self._select(keep)
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        if not self._rows:
            return
        for generation, sequence in self._rows:
            if sequence.length == len(sequence.blocks) * BLOCK_TOKENS:
                sequence.blocks.append(generation.take(self.pool))
        self._logits = self._decode_logits(tokens)
        for _, sequence in self._rows:
            sequence.length += 1

    def _decode_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every row's next-token logits [B, V] (float32) after feeding it tokens [B]:
        a CUDA graph's replay where there is one for the step's bucket, else eagerly."""
        tables, starts = [s.blocks for _, s in self._rows], [s.length for _, s in self._rows]
        adapters = [g.adapter for g, _ in self._rows]
        if self.graphs is not None:
            logits = self.graphs.logits(tokens, tables, starts, self._stack(adapters), adapters)
            if logits is not None:
                return logits
        return self._forward(tokens[:, None], tables, starts, [1] * len(starts), adapters, keep=1)[:, -1].float()

    def _score_sample(self, generation: Generation, sequence: _Sequence) -> None:
        """A finished sample's logprobs (and top-k rows) from a training pass over it. Out
        of memory there fails its request alone (generation.error)."""
        prompt = generation.spec.prompt
        tokens = np.concatenate([prompt, sequence.tokens]).astype(np.int64)
        scored = self._request_training_pass(generation, tokens, generation.spec.topk_sample_logprobs,
                                             f"a sample ({len(tokens)} tokens with its prompt)")
        if scored is None:
            return
        logprobs, top = scored
        completion = slice(len(prompt) - 1, None)
        sequence.logprobs = logprobs[completion].tolist()
        if top is not None:
            sequence.topk = list(zip(top[0][completion], top[1][completion]))

    def _score_prompt(self, generation: Generation) -> None:
        """The prompt's scores from a training pass over the prompt alone. Out of memory
        there fails its request alone (generation.error)."""
        spec = generation.spec
        scored = self._request_training_pass(generation, spec.prompt.astype(np.int64), spec.topk_prompt_logprobs,
                                             f"a prompt ({len(spec.prompt)} tokens)")
        if scored is not None:
            generation.scores = _prompt_scores(*scored, spec)

    def _request_training_pass(self, generation: Generation, tokens: np.ndarray, top: int, what: str
                               ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None] | None:
        """_training_pass for one request, whose length is the client's to choose: out of
        memory fails that request alone (generation.error; None), not the loop."""
        try:
            return self._training_pass(tokens, generation.adapter, top)
        except torch.OutOfMemoryError as error:
            generation.error = torch.OutOfMemoryError(
                f"scoring {what} by a training pass (--sampler-logprobs training): {error}")
            return None

    def _training_pass(self, tokens: np.ndarray, adapter: AdapterWeights | None, top: int
                       ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """Logprobs [L-1] of tokens[1:] after tokens[:-1], as training computes them for
        this datum alone; with `top` > 0 also each position's top most likely tokens,
        (ids, logprobs) [L-1, top]."""
        top = min(top, self._vocab_size)
        if len(tokens) < 2:  # nothing is predicted
            empty = (np.zeros((0, top), dtype=np.int32), np.zeros((0, top), dtype=np.float32))
            return np.zeros(0, dtype=np.float32), empty if top > 0 else None
        inputs = torch.from_numpy(tokens[None, :-1]).to(self.device)
        targets = torch.from_numpy(tokens[None, 1:, None]).to(self.device)
        with self._as_training(adapter):
            if top <= 0:
                return model_target_logprobs(self.model, inputs, targets)[0, :, 0].cpu().numpy(), None
            logprobs, best = model_target_and_top_logprobs(self.model, inputs, targets, top)
        return (logprobs[0, :, 0].cpu().numpy(),
                (best.indices[0].cpu().numpy().astype(np.int32), best.values[0].cpu().numpy()))

    def _as_training(self, adapter: AdapterWeights | None) -> contextlib.AbstractContextManager:
        """The model computes as training does, with `adapter`'s LoRA: through training's
        compiled layers when it has them (--compile), else eagerly with the loop's hooks
        (which round as peft's layers do). The base model (None), which no run trains, and
        an adapter of modules no run may adapt (no compiled hook) compute eagerly: a graph
        of their own would be compiled while requests wait."""
        if self.compiled is None or adapter is None or not all(
                hasattr(self._linears[name], "run_lora") for name in adapter):
            return self._adapted([adapter])
        if id(adapter) not in self._compiled_factors:
            self._compiled_factors = self._kept_for_use(self._compiled_factors)
            # Parameters (views, no copies) that require grad, as a run's factors: the graphs check
            # both (the sampler computes without grad either way).
            self._compiled_factors[id(adapter)] = (adapter, [
                compiled_layers.run_lora(self._linears[name], torch.nn.Parameter(a), torch.nn.Parameter(b), scale)
                for name, (a, b, scale) in adapter.items()])
        return self.compiled.computing(self._compiled_factors[id(adapter)][1])

    def _adapted(self, adapters: list[AdapterWeights | None]) -> contextlib.AbstractContextManager:
        """Rows i of the block's passes add adapters[i]'s LoRA delta (None: the base model's row)."""
        stack = self._stack(adapters)
        if stack is None:
            return contextlib.nullcontext()
        return lora_batch.applied(self._linears, stack.factors, stack.mask(adapters), stack.row_scales(adapters))

    def _select(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._logits = None
        else:
            self._logits = self._logits[torch.tensor(keep, dtype=torch.long, device=self._logits.device)]

    def _forward(self, tokens: torch.Tensor, tables: list[list[int]], starts: list[int], counts: list[int],
                 adapters: list[AdapterWeights | None], keep: int) -> torch.Tensor:
        """Logits [B, keep or Q, V] of B rows of counts[i] new tokens each (tokens [B, Q],
        left-padded), written to the KV pool."""
        step = kv_cache.build_step(self.pool, tables, starts, counts, self.device)
        with self._adapted(adapters):
            return self.model(input_ids=tokens, attention_mask=step.attention_mask(self._additive_mask),
                              position_ids=step.positions, cache=step, use_cache=True, logits_to_keep=keep).logits

    def _stack(self, adapters: list[AdapterWeights | None]) -> StackedAdapters | None:
        """The stacked factors of the distinct adapters among `adapters` (None: base model only)."""
        distinct = sorted({id(a): a for a in adapters if a is not None}.values(), key=id)  # any row order
        if not distinct:
            return None
        key = tuple(id(a) for a in distinct)
        if key not in self._stacks:
            self._stacks = self._kept_for_use(self._stacks)
            self._stacks[key] = StackedAdapters(distinct, self.device, self.pool.dtype)
        return self._stacks[key]

    def _kept_for_use(self, cache: dict) -> dict:
        """A cache keyed by adapters' ids (one, or a tuple), before an entry is added: only the
        entries of adapters a request of the loop still uses, 15 at most. The entries hold
        the adapters, and copies of their factors, on the device: a released snapshot's
        would otherwise stay there."""
        generations = [*self.waiting, *self.prefilling, *(g for g, _ in self._rows)]
        in_use = {id(g.adapter) for g in generations if g.adapter is not None}
        kept = {key: value for key, value in cache.items()
                if in_use.issuperset(key if isinstance(key, tuple) else (key,))}
        return kept if len(kept) < 16 else {}


def choose_tokens(logits: torch.Tensor, logprobs: torch.Tensor, settings: list[SamplingSettings],
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks one token per row of logits [B, V] (logprobs: their log_softmax), row i
    with settings[i] and generators[i]; returns (tokens [B], their unscaled logprobs [B])."""
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(settings) if s.temperature > 0]
    if sampled_rows:
        vocab = logits.shape[-1]
        index = torch.tensor(sampled_rows, device=logits.device)
        picked = [settings[i] for i in sampled_rows]
        temperature = torch.tensor([s.temperature for s in picked], device=logits.device)
        scores = logits[index] / temperature[:, None]
        top_k = [s.top_k if 0 < s.top_k < vocab else vocab for s in picked]
        if min(top_k) < vocab:
            values = torch.topk(scores, max(top_k), dim=-1).values
            kth = values.gather(1, torch.tensor(top_k, device=logits.device)[:, None] - 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if any(s.top_p < 1.0 for s in picked):
            scores = _nucleus(scores, torch.tensor([s.top_p if s.top_p < 1.0 else 2.0 for s in picked],
                                                   device=logits.device))
        cdf = torch.cumsum(torch.softmax(scores, dim=-1), dim=-1)
        total = cdf[:, -1:].contiguous()
        uniform = torch.tensor([float(torch.rand(1, generator=generators[i])) for i in sampled_rows],
                               device=logits.device)
        # The first token whose cumulative probability exceeds u * total (never a
        # zero-probability one), clamped to the last token with any probability.
        sampled = torch.searchsorted(cdf, uniform[:, None] * total, right=True)[:, 0]
        sampled = torch.minimum(sampled, torch.searchsorted(cdf, total)[:, 0])
        chosen = chosen.index_copy(0, index, sampled)
    return chosen, logprobs.gather(-1, chosen[:, None])[:, 0]


def _top_logprobs(logprobs: torch.Tensor, ks: list[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per row of logprobs [B, V] (unscaled), its ks[row] most likely tokens and
    their logprobs (ids [k], logprobs [k]); None for a row whose k is 0."""
    k = min(max(ks), logprobs.shape[-1])
    if k <= 0:
        return [None] * len(ks)
    top = torch.topk(logprobs, k, dim=-1)
    ids, values = top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy()
    return [(ids[row, :n], values[row, :n]) if n > 0 else None for row, n in enumerate(ks)]


def _nucleus(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks all but each row's most likely tokens whose probabilities first reach
    its top_p [B] (the most likely token always stays; a top_p of 2 masks nothing)."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    ordered = ordered.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)


def _chunk_scores(logits: torch.Tensor, targets: torch.Tensor, k: int
                  ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The logprobs [T] of targets [T] (int64), row i of logits [T, V] predicting target i,
    and with k > 0 each row's k most likely tokens (ids, logprobs) [T, k]."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0].cpu().numpy()
    k = min(k, logprobs.shape[-1])
    if k <= 0:
        return chosen, None
    best = torch.topk(logprobs, k, dim=-1)
    return chosen, (best.indices.cpu().numpy().astype(np.int32), best.values.cpu().numpy())


def _prompt_scores(logprobs: np.ndarray, top: tuple[np.ndarray, np.ndarray] | None, spec: SampleSpec
                   ) -> PromptScores:
    """The prompt's scores from the logprobs [L-1] of its tokens 1.. and their top-k rows
    (ids, logprobs) [L-1, k]: token 0 has no prediction."""
    length = len(spec.prompt)
    scores = PromptScores()
    if spec.prompt_logprobs:
        scores.logprobs = np.concatenate([[np.nan], logprobs]).astype(np.float32)
    if top is not None:
        k = top[0].shape[1]
        ids = np.zeros((length, k), dtype=np.int32)
        values = np.full((length, k), TOPK_MASK_LOGPROB, dtype=np.float32)
        ids[1:], values[1:] = top
        scores.topk_ids, scores.topk_logprobs = ids, values
    if spec.prompt_logprobs_last_n is not None:  # positions before the last n are not scored
        hidden = max(length - spec.prompt_logprobs_last_n, 0)
        if scores.logprobs is not None:
            scores.logprobs[:hidden] = np.nan
        if scores.topk_ids is not None:
            scores.topk_ids[:hidden], scores.topk_logprobs[:hidden] = 0, TOPK_MASK_LOGPROB
    return scores
