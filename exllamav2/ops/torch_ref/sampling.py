"""The sampler's vocabulary-wide steps: the tempered softmax and the sorted candidate list."""

from __future__ import annotations

import torch


def softmax_temperature(logits: torch.Tensor, temperature: float, smoothing_factor: float) -> torch.Tensor:
    """(b, V) logits, -inf for masked ids -> (b, V) probabilities. Smoothing makes the exponent quadratic."""
    top = logits.max(dim=-1, keepdim=True).values
    shifted = logits - top
    if smoothing_factor > 0:
        shifted = -shifted * shifted
        temperature = temperature / smoothing_factor
    return torch.softmax(shifted / temperature, dim=-1)


def top_candidates(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort descending (ties: lower id first); with 0 < top_k < V keep only the top_k most likely."""
    vocab = probs.shape[-1]
    if 0 < top_k < vocab:
        p, ids = torch.topk(probs, top_k, dim=-1, sorted=True)
        # topk's order among equal values is unspecified; make it follow the id
        order = torch.argsort(ids, dim=-1)
        p, ids = p.gather(-1, order), ids.gather(-1, order)
        order = torch.argsort(p, dim=-1, descending=True, stable=True)
        return _renormalise(p.gather(-1, order)), ids.gather(-1, order)
    p, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return p, ids


def _renormalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=-1, keepdim=True)
