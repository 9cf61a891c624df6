"""How many tokens a micro-batch may hold and how much graph a forward may keep,
from the memory the device has free.

Once the model is loaded, a probe pass (forward and backward of one sequence
through a temporary LoRA adapter) measures the memory a token of activations
costs. On CUDA the micro-batch size and the keep-graph budget are cut from the
free memory after a headroom. On the CPU, whose memory is the host's and shared
with everything else on the machine, a micro-batch's activations get a fixed
budget and kept graphs another. Flags override either.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

CPU_MICRO_BATCH_ACTIVATION_BYTES = 256 * 1024**2
CPU_MAX_MICRO_BATCH_TOKENS = 16384
CPU_KEEP_GRAPH_BUDGET_BYTES = 2 * 1024**3
PROBE_TOKENS = 1024
CPU_PROBE_TOKENS = 128  # the probe's own activations count in the server's peak host memory
# Left free for what the plan does not see: optimizer state of new runs,
# sampling, the allocator's fragmentation.
HEADROOM_FRACTION = 0.15
MIN_HEADROOM_BYTES = 2 * 1024**3
MIN_MICRO_BATCH_TOKENS = 256
MAX_MICRO_BATCH_TOKENS = 65536
# glibc's mallopt() parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
HOST_MMAP_THRESHOLD_BYTES = 256 * 1024


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


def return_freed_host_memory() -> None:
    """Has glibc give freed host memory back to the system instead of keeping it.

    By default it serves blocks below a threshold that grows to 32 MiB from heaps
    it keeps, one per thread: the activations a training pass frees stay resident
    and fragment, and the next pass's differently sized ones grow the heap (a 135M
    model's RL loop held 2.3 GB between steps, 1.45 GB with this; peak 2.4 -> 1.8 GB,
    for ~10% more time in page faults). Blocks from 256 KiB up are then mapped on
    their own and unmapped when freed (larger thresholds kept most of the waste),
    and one heap serves every thread. Nothing happens off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_ARENA_MAX, 1)


def plan_from_free(free: int, bytes_per_token: int) -> tuple[int, int]:
    """(micro-batch tokens, keep-graph budget bytes) for `free` bytes: half of the
    usable memory for one micro-batch's activations, the rest for kept graphs (a
    forward leg computes its next micro-batch while holding them). Fewer, larger
    micro-batches are faster: on an H100, 1.1B Llama, 8 x 1024 tokens in one
    micro-batch of 8192 tokens took 0.28 s, in two of 4096, 0.32 s."""
    usable = max(0, free - max(MIN_HEADROOM_BYTES, int(free * HEADROOM_FRACTION)))
    tokens = _whole_tokens(usable // 2 // max(1, bytes_per_token), MAX_MICRO_BATCH_TOKENS)
    return tokens, max(0, usable - tokens * bytes_per_token)


def cpu_plan(bytes_per_token: int) -> tuple[int, int]:
    """(micro-batch tokens, keep-graph budget bytes) on the CPU: as many tokens as
    CPU_MICRO_BATCH_ACTIVATION_BYTES of activations hold, but at least
    MIN_MICRO_BATCH_TOKENS (a 135M model's 1.4 MB a token would make a fixed
    16k-token micro-batch 22 GB), and a fixed budget."""
    tokens = CPU_MICRO_BATCH_ACTIVATION_BYTES // max(1, bytes_per_token)
    return _whole_tokens(tokens, CPU_MAX_MICRO_BATCH_TOKENS), CPU_KEEP_GRAPH_BUDGET_BYTES


def _whole_tokens(tokens: int, most: int) -> int:
    """`tokens` rounded down to a multiple of 256, within [MIN_MICRO_BATCH_TOKENS, most]."""
    return min(most, max(MIN_MICRO_BATCH_TOKENS, tokens // 256 * 256))


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
