"""A block-allocated (paged) KV cache for the sampler's decode loop.

Keys and values of every sequence live in one pool per layer, [slots, kv_heads,
head_dim], cut into blocks of BLOCK_TOKENS slots. A sequence owns a list of
blocks (its block table); the num_samples sequences of one request share the
blocks of their prompt (a block is freed when its last holder lets go). The
pool's size is a byte budget: a request is admitted only when blocks for its
whole worst case (prompt + max_tokens per sample) can be reserved, so a running
sequence never runs out and admission waits instead of failing.

The pool tensors are allocated once, empty. On the CPU, pages the OS has not
been asked for yet cost nothing, so use grows with the blocks written; on CUDA
the whole budget is allocated at start-up, before the training memory plan.

`Step` is what a model forward pass needs: where each row's new keys go and
which slots each row attends to. The model calls `update()` per layer (the
transformers Cache protocol, duck-typed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16
ZERO_SLOT = 0      # block 0 holds zeros, never handed out: what padding positions read
SCRATCH_BLOCK = 1  # never handed out either: padding rows of a bucketed step write and read it


def kv_heads_and_dim(config) -> tuple[int, int]:
    """The model's key / value heads per layer and their dimension."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV bytes one token takes across all layers (keys and values)."""
    kv_heads, head_dim = kv_heads_and_dim(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class BlockPool:
    """The KV storage and its block allocator. Worker thread only."""

    def __init__(self, config, budget_bytes: int, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.kv_heads, self.head_dim = kv_heads_and_dim(config)
        self.block_bytes = bytes_per_token(config, dtype) * BLOCK_TOKENS
        self.num_blocks = max(budget_bytes // self.block_bytes, 3)  # zero and scratch blocks, and one more
        slots = self.num_blocks * BLOCK_TOKENS
        self.keys = [torch.empty(slots, self.kv_heads, self.head_dim, dtype=dtype, device=device)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        for pool in (*self.keys, *self.values):
            pool[:BLOCK_TOKENS] = 0
        self._free = list(range(self.num_blocks - 1, SCRATCH_BLOCK, -1))
        self._holders = [0] * self.num_blocks
        self.reserved = 0  # blocks promised to admitted requests, not yet taken

    @property
    def budget_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def usable_blocks(self) -> int:
        """Blocks sequences can hold: all but the zero and scratch blocks."""
        return self.num_blocks - 2

    @property
    def used_bytes(self) -> int:
        """Bytes of blocks held by sequences now."""
        return (self.usable_blocks - len(self._free)) * self.block_bytes

    def reserve(self, blocks: int) -> bool:
        """Promises `blocks` future blocks; False (nothing changes) if they are not free."""
        if self.reserved + blocks > len(self._free):
            return False
        self.reserved += blocks
        return True

    def unreserve(self, blocks: int) -> None:
        self.reserved -= blocks

    def take(self) -> int:
        """A reserved block, now held once."""
        self.reserved -= 1
        block = self._free.pop()
        self._holders[block] = 1
        return block

    def share(self, block: int) -> None:
        self._holders[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)

    def copy_block(self, source: int, target: int, tokens: int) -> None:
        """Copies the first `tokens` slots of a block (a shared prompt's last, partial block)."""
        src, dst = source * BLOCK_TOKENS, target * BLOCK_TOKENS
        for pool in (*self.keys, *self.values):
            pool[dst:dst + tokens] = pool[src:src + tokens]


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


@dataclass
class Step:
    """One forward pass over B rows of up to Q new tokens each, as the pool sees it.
    A row with fewer new tokens is left-padded: its padding queries write the
    scratch block and see what the row's first new token sees (finite, unused).

    positions [B, Q]: each query's position in its sequence;
    write_slots [B*Q]: the pool slot each query's key / value goes to (row-major);
    read_slots [B, T]: the slots each row attends to, its past and new tokens,
    padded with slot 0; attend [B, 1, Q, T] (bool): which of them each query sees.
    """

    pool: BlockPool
    positions: torch.Tensor
    write_slots: torch.Tensor
    read_slots: torch.Tensor
    attend: torch.Tensor

    def attention_mask(self, additive: bool) -> torch.Tensor:
        """`attend` as the model's attention takes it: bool (sdpa), or 0 / most
        negative float added to the scores (eager attention)."""
        if not additive:
            return self.attend
        return torch.zeros(self.attend.shape, device=self.attend.device).masked_fill(
            ~self.attend, torch.finfo(torch.float32).min)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the layer's new keys / values [B, H, Q, D] and returns every
        row's keys / values [B, H, T, D] (the transformers Cache.update contract)."""
        batch, heads, _, dim = keys.shape
        key_pool, value_pool = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        key_pool.index_copy_(0, self.write_slots, keys.transpose(1, 2).reshape(-1, heads, dim).to(key_pool.dtype))
        value_pool.index_copy_(0, self.write_slots,
                               values.transpose(1, 2).reshape(-1, heads, dim).to(value_pool.dtype))
        flat = self.read_slots.reshape(-1)
        length = self.read_slots.shape[1]
        past_keys = key_pool.index_select(0, flat).view(batch, length, heads, dim).transpose(1, 2)
        past_values = value_pool.index_select(0, flat).view(batch, length, heads, dim).transpose(1, 2)
        return past_keys, past_values


def build_step(pool: BlockPool, tables: list[list[int]], starts: list[int], counts: list[int],
               device: torch.device, length: int = 0) -> Step:
    """Row i writes counts[i] new tokens at positions starts[i].. of the sequence
    whose block table is tables[i], and attends causally to positions 0..its own.
    Every row reads at least `length` positions (a bucketed step's fixed width).
    Built on `device` from the block tables alone (no host-side [B, T] tensors)."""
    width = max(counts)
    length = max(max(s + c for s, c in zip(starts, counts)), length)
    table_width = blocks_for(length)
    table = torch.tensor([t[:table_width] + [0] * (table_width - len(t[:table_width])) for t in tables],
                         device=device)
    start = torch.tensor(starts, device=device)[:, None]
    count = torch.tensor(counts, device=device)[:, None]
    query = torch.arange(width, device=device)[None, :]
    padded = query < width - count                                        # [B, Q] left padding
    new = torch.where(padded, start, start + query - (width - count))     # [B, Q] positions written
    every = torch.arange(length, device=device)[None, :].expand(len(tables), -1)  # [B, T] positions read

    def slots(positions: torch.Tensor) -> torch.Tensor:
        return table.gather(1, positions // BLOCK_TOKENS) * BLOCK_TOKENS + positions % BLOCK_TOKENS

    attend = every[:, None, :] <= new[:, :, None]                          # [B, Q, T]
    write = torch.where(padded, SCRATCH_BLOCK * BLOCK_TOKENS, slots(new))
    # Past a row's end: the zero block, never garbage (a NaN there would leak through the mask).
    read = torch.where(every < start + count, slots(every), ZERO_SLOT)
    return Step(pool, new, write.reshape(-1), read, attend[:, None])
