"""The sampler's decode step replayed as CUDA graphs.

An eager decode step of a 1B model is tens of milliseconds of Python and kernel
launches around about one millisecond of work on the card. A CUDA graph replays
the step's kernels with one launch, but it has fixed shapes and addresses. So a
step is padded to a bucket (rows, context width and stacked LoRA rank, each a
power of two) and its inputs are copied into that bucket's static tensors before
each replay:

- padding rows feed token 0 at position 0, writing and reading the pool's
  scratch block (their logits are dropped);
- padding context positions read the zero block and are masked;
- the batch's LoRA factors are copied into static stacks of the bucket's rank
  (zero columns past the batch's own), and the per-row mask and scales into
  static ones.

A bucket's graph is captured the first time it is needed; all graphs share one
memory pool (they never run at the same time, and each output is copied out
before the next replay). With `capture=False` the same padded static path runs
eagerly: how the CPU tests check everything but the capture itself.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from gradwire_server import kv_cache, lora_batch
from gradwire_server.kv_cache import SCRATCH_BLOCK, BlockPool, Step
from gradwire_server.lora_batch import AdapterWeights, StackedAdapters

log = logging.getLogger(__name__)

MAX_ROWS = 512                 # larger batches decode eagerly
# rows x context width of the largest bucket: its gathered keys / values stay in the graph pool
# (1.1B model: 128 MiB a tensor, more where attention repeats KV heads)
MAX_ROW_POSITIONS = 2**18
MIN_CONTEXT = 64
MIN_RANK = 8


def bucket_size(count: int, least: int = 1) -> int:
    """The power of two at or above `count` (at least `least`)."""
    return max(least, 1 << max(count - 1, 0).bit_length())


@dataclass(frozen=True)
class BucketKey:
    rows: int
    context: int
    rank: int                  # 0: no LoRA rows
    modules: tuple[str, ...]   # the adapted modules (hooks are part of the graph)


@dataclass
class _Bucket:
    """A bucket's static inputs, its graph and the output it writes."""

    tokens: torch.Tensor       # [rows, 1]
    step: Step                 # positions [rows, 1], write_slots [rows], read_slots [rows, context], attend
    mask: torch.Tensor | None  # [rows, 1, rank]
    scales: torch.Tensor | None  # [modules, rows, 1, 1] float32
    logits: torch.Tensor | None = None  # [rows, V], written by each replay
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Decode steps (one new token per row) as bucketed CUDA graphs. Worker thread only,
    inside the decode loop's `base_weights` block (the graphs record the model as it
    computes there)."""

    def __init__(self, model: torch.nn.Module, linears: dict[str, torch.nn.Linear], pool: BlockPool,
                 device: torch.device, additive_mask: bool, capture: bool = True):
        """`linears`: the model's adaptable Linears by name (lora_batch.adaptable_linears)."""
        self.model, self.linears, self.pool, self.device = model, linears, pool, device
        self.additive_mask = additive_mask     # eager attention: see Step.attention_mask
        self.capture = capture
        self.enabled = True                    # False after a capture failed: every step eager
        self._buckets: dict[BucketKey, _Bucket] = {}
        self._eager: set[BucketKey] = set()    # buckets whose capture ran out of memory
        self._factors: dict[tuple[int, tuple[str, ...]], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._loaded: dict[tuple[int, tuple[str, ...]], StackedAdapters] = {}  # whose factors each stack holds
        self._memory = torch.cuda.graph_pool_handle() if capture else None
        self.captured = 0

    def logits(self, tokens: torch.Tensor, tables: list[list[int]], starts: list[int],
               stack: StackedAdapters | None, adapters: list[AdapterWeights | None]) -> torch.Tensor | None:
        """Each row's next-token logits [B, V] (float32) after feeding tokens [B] at
        positions starts[i] of the sequences with block tables `tables`, rows using
        `adapters` (stacked in `stack`); None when the step has no bucket (too
        large, or graphs are off): the caller runs it eagerly."""
        rows = len(tables)
        key = BucketKey(bucket_size(rows), bucket_size(max(starts) + 1, MIN_CONTEXT),
                        bucket_size(stack.rank, MIN_RANK) if stack else 0,
                        tuple(stack.factors) if stack else ())
        if (not self.enabled or key in self._eager or key.rows > MAX_ROWS
                or key.rows * key.context > MAX_ROW_POSITIONS):
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._new_bucket(key)
            if bucket is None:
                return None
        padding = key.rows - rows
        step = kv_cache.build_step(self.pool, tables + [[SCRATCH_BLOCK]] * padding, starts + [0] * padding,
                                   [1] * key.rows, self.device, length=key.context)
        for static, fresh in ((bucket.step.positions, step.positions), (bucket.step.write_slots, step.write_slots),
                              (bucket.step.read_slots, step.read_slots), (bucket.step.attend, step.attend)):
            static.copy_(fresh)
        bucket.tokens[rows:] = 0
        bucket.tokens[:rows, 0] = tokens
        if stack:
            self._load(key, stack)
            bucket.mask.zero_()
            bucket.mask[:rows, :, :stack.rank] = stack.mask(adapters)
            bucket.scales[:, :rows] = stack.row_scales(adapters)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.logits = self._forward(bucket, key)
        return bucket.logits[:rows].to(torch.float32, copy=True)

    def _new_bucket(self, key: BucketKey) -> _Bucket | None:
        """A bucket whose static inputs are all padding, its graph captured (CUDA)."""
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=self.device)
        step = kv_cache.build_step(self.pool, [[SCRATCH_BLOCK]] * key.rows, [0] * key.rows, [1] * key.rows,
                                   self.device, length=key.context)
        bucket = _Bucket(tokens=zeros(key.rows, 1), step=step,
                         mask=zeros(key.rows, 1, key.rank, dtype=self.pool.dtype) if key.rank else None,
                         scales=zeros(len(key.modules), key.rows, 1, 1, dtype=torch.float32) if key.rank else None)
        if key.rank and (key.rank, key.modules) not in self._factors:
            self._factors[key.rank, key.modules] = self._new_factors(key)
        if self.capture:
            try:
                bucket.graph, bucket.logits = self._capture(bucket, key)
            except torch.OutOfMemoryError:  # this bucket decodes eagerly; the others keep their graphs
                log.warning("no memory to capture the decode step for %s; it runs eagerly", key)
                self._eager.add(key)
                return None
            except Exception:  # noqa: BLE001 - an unsupported model or kernel: decode eagerly from now on
                log.exception("capturing a CUDA graph of the decode step failed; decoding eagerly from now on")
                self.enabled = False
                return None
            self.captured += 1
        self._buckets[key] = bucket
        return bucket

    def _new_factors(self, key: BucketKey) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Static A [rank, in] and B [out, rank] per adapted module, in the pool's dtype (the model's)."""
        factors = {}
        for name in key.modules:
            weight = self.linears[name].weight
            factors[name] = (torch.zeros(key.rank, weight.shape[1], dtype=self.pool.dtype, device=self.device),
                             torch.zeros(weight.shape[0], key.rank, dtype=self.pool.dtype, device=self.device))
        return factors

    def _load(self, key: BucketKey, stack: StackedAdapters) -> None:
        """Copies the stack's factors into the static ones of its rank, unless they hold them already."""
        slot = (key.rank, key.modules)
        if self._loaded.get(slot) is stack:
            return
        for name, (a, b) in self._factors[slot].items():
            stacked_a, stacked_b = stack.factors[name]
            a.zero_()
            b.zero_()
            a[:stack.rank] = stacked_a
            b[:, :stack.rank] = stacked_b
        self._loaded[slot] = stack

    def _forward(self, bucket: _Bucket, key: BucketKey) -> torch.Tensor:
        factors = self._factors.get((key.rank, key.modules))
        with lora_batch.applied(self.linears, factors, bucket.mask, bucket.scales) if key.rank \
                else contextlib.nullcontext():
            return self.model(input_ids=bucket.tokens, attention_mask=bucket.step.attention_mask(self.additive_mask),
                              position_ids=bucket.step.positions, cache=bucket.step, use_cache=True,
                              logits_to_keep=1).logits[:, -1]

    def _capture(self, bucket: _Bucket, key: BucketKey) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # A warm-up pass on a side stream first (kernel choice, workspaces outside the graph);
        # autocast's weight cache off, since cached casts would be freed behind the graph's back.
        autocast = torch.autocast(self.device.type, dtype=torch.get_autocast_dtype(self.device.type),
                                  enabled=torch.is_autocast_enabled(self.device.type), cache_enabled=False)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), autocast:
            self._forward(bucket, key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory, capture_error_mode="thread_local"), autocast:
            logits = self._forward(bucket, key)
        return graph, logits
