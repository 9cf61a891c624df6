"""Chunked unembedding + log_softmax + gather: the same logprobs and gradients as
the whole [B, L, V] computation, without autograd keeping [B, L, V] for backward."""
from __future__ import annotations

import pytest
import torch

from gradwire_server.logprobs import chunked_target_logprobs, logprobs_from_logits


def inputs(batch: int, length: int, hidden: int, vocab: int, width: int = 2):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(batch, length, hidden, generator=generator, requires_grad=True)
    unembed = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        unembed.weight.copy_(torch.randn(vocab, hidden, generator=generator) / hidden**0.5)
    targets = torch.randint(0, vocab, (batch, length, width), generator=generator)
    return states, unembed, targets


def saved_bytes(compute) -> int:
    """Bytes of the tensors autograd saves for backward while `compute()` runs."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return sum(storages.values())


@pytest.mark.parametrize("positions_per_chunk", [1, 5, 37, 100])
def test_chunks_give_the_whole_computation(positions_per_chunk):
    states, unembed, targets = inputs(3, 37, 16, 1000)
    whole = logprobs_from_logits(unembed(states), targets)
    grads_whole = torch.autograd.grad((whole * whole).sum(), [states, unembed.weight])
    chunked = chunked_target_logprobs(states, unembed, targets, 1000,
                                      chunk_elements=positions_per_chunk * 3 * 1000)
    grads_chunked = torch.autograd.grad((chunked * chunked).sum(), [states, unembed.weight])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    for got, want in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_backward_keeps_no_full_logits():
    """32k vocabulary, 2 x 256 positions: the whole computation saves its [B, L, V]
    float32 log_softmax (64 MiB); the chunked one saves less than one chunk's logits."""
    batch, length, vocab = 2, 256, 32768
    states, unembed, targets = inputs(batch, length, 32, vocab)
    full_logits = batch * length * vocab * 4
    chunk_elements = 2**20
    whole = saved_bytes(lambda: logprobs_from_logits(unembed(states), targets))
    chunked = saved_bytes(lambda: chunked_target_logprobs(states, unembed, targets, vocab, chunk_elements))
    assert whole >= full_logits
    assert chunked < chunk_elements * 4


def test_without_grad_nothing_is_recomputed_or_kept():
    states, unembed, targets = inputs(2, 9, 8, 50)
    with torch.no_grad():
        chunked = chunked_target_logprobs(states, unembed, targets, 50, chunk_elements=2 * 50 * 4)
    assert chunked.grad_fn is None
    torch.testing.assert_close(chunked, logprobs_from_logits(unembed(states), targets).detach(), rtol=0, atol=1e-5)
