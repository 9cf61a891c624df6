"""How many tokens a micro-batch may hold and how much graph a forward may keep,
from the memory the device has free.

Once the model is loaded, a probe pass (forward and backward of two sequences
through a temporary LoRA adapter) measures what a token of activations costs. On
CUDA the micro-batch size and the keep-graph budget are cut from the free memory
after a headroom. On the CPU, whose memory is shared with everything else on the
machine, a micro-batch holds a fixed amount of activations and the keep-graph
budget is fixed. Flags override either.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CPU_MICRO_BATCH_TOKENS = 16384          # at most, on the CPU
# One CPU micro-batch's activations. Smaller micro-batches were faster there, not only
# leaner (smollm2-135m, 2 cores: 256 tokens 4.6 s, one of 1,016 tokens 5.3 s; BENCHMARKS.md).
CPU_ACTIVATION_BYTES = 256 * 1024**2
CPU_KEEP_GRAPH_BUDGET_BYTES = 2 * 1024**3
PROBE_TOKENS = 1024
CPU_PROBE_TOKENS = 256  # the CPU's probe is slow; bytes per token barely change with the length
# Left free for what the plan does not see: optimizer state of new runs,
# sampling, the allocator's fragmentation.
HEADROOM_FRACTION = 0.15
MIN_HEADROOM_BYTES = 2 * 1024**3
MIN_MICRO_BATCH_TOKENS = 256
MAX_MICRO_BATCH_TOKENS = 65536


class OutOfMemory(MemoryError):
    """A micro-batch did not fit the device: the request fails alone."""

    def __init__(self, datums: int, length: int, free: int, device: torch.device):
        super().__init__(
            f"out of {device.type} memory computing a micro-batch of {datums} datums x {length} tokens "
            f"({datums * length} padded tokens) with {gib(free)} free; send fewer or shorter datums per "
            f"request, or start the server with a smaller --micro-batch-tokens")


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_tokens: int            # padded tokens per forward pass
    keep_graph_budget_bytes: int       # activations forward legs may keep for their backward legs
    activation_bytes_per_token: int    # measured by the probe pass; 0 where none ran


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: on CUDA the driver's free memory plus
    what PyTorch's allocator has cached but not handed out; on the CPU MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_from_free(free: int, bytes_per_token: int) -> tuple[int, int]:
    """(micro-batch tokens, keep-graph budget bytes) for `free` bytes: half of the
    usable memory for one micro-batch's activations, the rest for kept graphs (a
    forward leg computes its next micro-batch while holding them). Fewer, larger
    micro-batches are faster: on an H100, 1.1B Llama, 8 x 1024 tokens in one
    micro-batch of 8192 tokens took 0.28 s, in two of 4096, 0.32 s."""
    usable = max(0, free - max(MIN_HEADROOM_BYTES, int(free * HEADROOM_FRACTION)))
    tokens = usable // 2 // max(1, bytes_per_token)
    tokens = min(MAX_MICRO_BATCH_TOKENS, max(MIN_MICRO_BATCH_TOKENS, tokens // 256 * 256))
    return tokens, max(0, usable - tokens * bytes_per_token)


def cpu_plan(bytes_per_token: int) -> tuple[int, int]:
    """(micro-batch tokens, keep-graph budget bytes) on the CPU: micro-batches of
    CPU_ACTIVATION_BYTES of activations, within MIN_MICRO_BATCH_TOKENS and
    CPU_MICRO_BATCH_TOKENS; the fixed keep-graph budget."""
    tokens = CPU_ACTIVATION_BYTES // max(1, bytes_per_token) // 256 * 256
    return min(CPU_MICRO_BATCH_TOKENS, max(MIN_MICRO_BATCH_TOKENS, tokens)), CPU_KEEP_GRAPH_BUDGET_BYTES


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
