"""Perplexity of a token sequence over sliding windows, for any function that maps ids to logits (our model, or
a reference model in tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    scored_tokens: int
    windows: int


def window_plan(num_tokens: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: windows of `length` tokens every `stride` tokens; each token is
    scored once, in the first window that ends past it (so it sees up to length - stride tokens of context)."""
    if length <= 0 or stride <= 0:
        raise ValueError(f"perplexity: length and stride must be positive, got length={length}, stride={stride}")
    if stride > length:
        raise ValueError(f"perplexity: stride {stride} is larger than the window length {length}; tokens would be skipped")
    plan, scored_to = [], 0
    for begin in range(0, max(num_tokens, 1), stride):
        end = min(begin + length, num_tokens)
        plan.append((begin, end, max(scored_to, begin)))
        scored_to = end
        if end >= num_tokens:
            break
    return plan


@torch.inference_mode()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, length: int = 2048,
               stride: int = 512, bos_token_id: int | None = None, progress: bool = False) -> PerplexityResult:
    """`ids` (n,) or (1, n) without BOS. With `bos_token_id`, every window starts with BOS, so the first token of
    the text is scored too; without it the first token of the text only serves as context."""
    ids = ids.view(-1).long()
    n = ids.shape[0]
    if n < 2:
        raise ValueError(f"perplexity: need at least 2 tokens, got {n}")
    # BOS takes one slot of each window
    body = length - 1 if bos_token_id is not None else length
    plan = window_plan(n, body, min(stride, body))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="Perplexity", unit="window", leave=False)
    nll, count = 0.0, 0
    for begin, end, first in plan:
        window = ids[begin:end]
        shift = 0
        if bos_token_id is not None:
            window = torch.cat([torch.tensor([bos_token_id]), window])
            shift = 1
        else:
            first = max(first, begin + 1)  # the window's first token has nothing to be predicted from
        if first < end:
            logits = logits_fn(window.unsqueeze(0)).float()
            # logits at window index i predict window index i + 1; text position t sits at index t - begin + shift
            pred = logits[0, first - begin + shift - 1:end - begin + shift - 1]
            targets = ids[first:end].to(pred.device)
            logprobs = torch.log_softmax(pred, dim=-1).gather(-1, targets.unsqueeze(-1))
            nll -= float(logprobs.sum())
            count += end - first
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    mean = nll / count
    return PerplexityResult(math.exp(mean), mean, count, len(plan))


def model_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of our model for one window, without a cache."""
    return lambda window: model.forward(window)
