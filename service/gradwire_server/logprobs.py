"""Token logprobs from a causal LM: log_softmax over the vocabulary in float32,
gathered at the target tokens. The sampler computes the same float32
log_softmax of the unscaled logits (over its KV-cached decode), so sampled and
training logprobs of the same tokens agree to the rounding of the model's dtype;
with `--sampler-logprobs training` it calls model_target_logprobs itself on each
finished sequence, so they agree exactly.

Training unembeds the last hidden states in chunks of positions: the whole
micro-batch's float32 logits ([B, L, V], 2 GiB for 8 x 1024 tokens and a 64k
vocabulary) never exist at once, and each chunk's backward recomputes its
logits (a checkpoint) instead of keeping them.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# float32 logits in flight per chunk: 64 MiB on the CPU, where memory is the host's and shared;
# 256 MiB on CUDA, where smaller chunks cost time (H100, 1.1B Llama, 8 x 1024 tokens: 64 MiB
# chunks made a forward-backward 5-15% slower) and save little of the card's memory.
LOGITS_CHUNK_ELEMENTS = 2**24
CUDA_LOGITS_CHUNK_ELEMENTS = 2**26


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) in float32 at `targets` ([..., V] logits, [..., K] targets -> [..., K])."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets)


def model_target_logprobs(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logprobs [B, L, K] of `targets` after each position of `tokens` [B, L], as
    training computes them: the decoder, then the chunked unembedding. Run under
    the engine's autocast."""
    hidden = model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state  # [B, L, H]
    unembed = model.get_output_embeddings()
    return chunked_target_logprobs(hidden, unembed, targets, unembed.weight.shape[0], _chunk_elements(hidden))


@torch.no_grad()
def model_target_and_top_logprobs(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                                  top: int) -> tuple[torch.Tensor, torch.return_types.topk]:
    """model_target_logprobs's numbers (the same chunks of positions, gathered from the
    same log_softmax), and each position's `top` most likely tokens and their logprobs,
    (values, indices) [B, L, top]."""
    hidden = model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state
    unembed = model.get_output_embeddings()
    vocab_size = unembed.weight.shape[0]
    chunk = _positions_per_chunk(tokens.shape[0], vocab_size, _chunk_elements(hidden))
    chosen, best = [], []
    for start in range(0, tokens.shape[1], chunk):
        logprobs = torch.log_softmax(unembed(hidden[:, start:start + chunk]).float(), dim=-1)
        chosen.append(logprobs.gather(-1, targets[:, start:start + chunk]))
        best.append(torch.topk(logprobs, min(top, vocab_size), dim=-1))
    return torch.cat(chosen, dim=1), torch.return_types.topk((torch.cat([b.values for b in best], dim=1),
                                                              torch.cat([b.indices for b in best], dim=1)))


def _chunk_elements(hidden: torch.Tensor) -> int:
    return CUDA_LOGITS_CHUNK_ELEMENTS if hidden.device.type == "cuda" else LOGITS_CHUNK_ELEMENTS


def _positions_per_chunk(batch: int, vocab_size: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // (batch * vocab_size))


def chunked_target_logprobs(hidden: torch.Tensor, unembed: torch.nn.Module, targets: torch.Tensor,
                    vocab_size: int, chunk_elements: int = LOGITS_CHUNK_ELEMENTS) -> torch.Tensor:
    """Logprobs [B, L, K] of `targets` given last hidden states [B, L, H], computed
    `chunk_elements // (B * vocab_size)` positions at a time (recomputed in backward
    when there is more than one chunk)."""
    batch, length = targets.shape[:2]
    chunk = _positions_per_chunk(batch, vocab_size, chunk_elements)
    # One chunk holds the whole micro-batch within the budget: nothing to gain from recomputing it.
    recompute = torch.is_grad_enabled() and length > chunk
    parts = []
    for start in range(0, length, chunk):
        hidden_part, targets_part = hidden[:, start:start + chunk], targets[:, start:start + chunk]
        if recompute:
            parts.append(checkpoint(_unembedded_logprobs, unembed, hidden_part, targets_part,
                                    use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_unembedded_logprobs(unembed, hidden_part, targets_part))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _unembedded_logprobs(unembed: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logprobs_from_logits(unembed(hidden), targets)
