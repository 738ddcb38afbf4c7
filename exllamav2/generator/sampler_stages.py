"""
The probability stages of the sampler, vectorised over the batch.

After the softmax every row is held as candidates sorted by probability, descending: `probs` (b, n) and `ids`
(b, n). A stage removes candidates by zeroing their probability and renormalises, so the order never changes
and position 0 is always the most likely candidate left (every stage keeps at least one).
"""
from __future__ import annotations

import math

import torch

from .. import ops


def softmax_with_temperature(logits: torch.Tensor, temperature: float, smoothing_factor: float) -> torch.Tensor:
    """(b, V) logits, -inf for masked ids -> (b, V) probabilities. Smoothing makes the exponent quadratic."""
    return ops.softmax_temperature(logits, temperature, smoothing_factor)


def sorted_candidates(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort descending (ties: lower id first); with 0 < top_k < V keep only the top_k most likely."""
    return ops.top_candidates(probs, top_k)


def renormalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=-1, keepdim=True)


def _keep(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.clone()
    keep[:, 0] = True
    return renormalise(torch.where(keep, p, torch.zeros_like(p)))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    return -(p * logp).sum(dim=-1)


def top_p(p: torch.Tensor, value: float) -> torch.Tensor:
    """Keep the most likely candidates whose cumulative probability stays <= value (at least one), as the
    original does; note this leaves out the candidate that crosses the bound."""
    return _keep(p, p.cumsum(dim=-1) <= value)


def top_a(p: torch.Tensor, value: float) -> torch.Tensor:
    """Keep candidates with p >= value * p_max ** 2."""
    return _keep(p, p >= value * p[:, :1] * p[:, :1])


def min_p(p: torch.Tensor, value: float) -> torch.Tensor:
    """Keep candidates with p >= value * p_max."""
    return _keep(p, p >= value * p[:, :1])


def tail_free(p: torch.Tensor, value: float) -> torch.Tensor:
    """
    Tail-free sampling. d_i = |p_i - 2 p_{i+1} + p_{i+2}| over the live candidates, normalised to sum 1; keep
    the first k + 1 candidates where k counts the leading cumulative sums <= value. Fewer than three candidates,
    or no curvature at all, keep everything.
    """
    keep = tail_free_keep(p, value)
    return p if keep is None else _keep(p, keep)


def tail_free_keep(p: torch.Tensor, value) -> torch.Tensor | None:
    """The candidates tail-free sampling keeps (`value` a float or one per row, (batch, 1)); None for fewer than
    three candidates. Shared by the host stage above and the device one (sampler_device_stages.py)."""
    n = p.shape[-1]
    if n < 3:
        return None
    live = (p > 0).sum(dim=-1, keepdim=True)
    d = (p[:, :-2] - 2 * p[:, 1:-1] + p[:, 2:]).abs()
    valid = torch.arange(n - 2, device=p.device).unsqueeze(0) < live - 2
    d = torch.where(valid, d, torch.zeros_like(d))
    dsum = d.sum(dim=-1, keepdim=True)
    cum = d.cumsum(dim=-1) / dsum.clamp(min=torch.finfo(p.dtype).tiny)
    k = ((cum <= value) & valid).sum(dim=-1, keepdim=True)
    keep = torch.arange(n, device=p.device).unsqueeze(0) < k + 1
    return keep | (live < 3) | (dsum == 0)


def typical_keep(p: torch.Tensor, value) -> torch.Tensor:
    """The candidates locally typical sampling keeps (`value` a float or one per row, (batch, 1)): the shortest run,
    in order of |surprise - entropy|, whose mass reaches `value`. Shared with sampler_device_stages.py."""
    live = p > 0
    entropy = _entropy(p).unsqueeze(-1)
    deviation = torch.where(live, (-p.clamp(min=torch.finfo(p.dtype).tiny).log() - entropy).abs(), math.inf)
    order = torch.argsort(deviation, dim=-1, stable=True)
    mass = p.gather(-1, order).cumsum(dim=-1)
    count = (mass < value).sum(dim=-1, keepdim=True) + 1
    keep_in_order = torch.arange(p.shape[-1], device=p.device).unsqueeze(0) < count
    return torch.zeros_like(live).scatter(-1, order, keep_in_order) & live


def typical(p: torch.Tensor, ids: torch.Tensor, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Locally typical sampling (as HF's TypicalLogitsWarper): order candidates by |-log p - H| and keep the
    shortest run in that order whose mass reaches `value`. (The original's C++ misplaces a log term here.)
    This stage may drop the most likely candidate, so it re-sorts and returns (probs, ids).
    """
    keep = typical_keep(p, value)
    p = renormalise(torch.where(keep, p, torch.zeros_like(p)))
    resort = torch.argsort(p, dim=-1, descending=True, stable=True)
    return p.gather(-1, resort), ids.gather(-1, resort)


def mirostat_truncate(p: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mirostat v2: drop candidates whose surprise -log2 p exceeds mu (b,)."""
    return _keep(p, p >= torch.pow(2.0, -mu).unsqueeze(-1))


def mirostat_update(mu: torch.Tensor, chosen_prob: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    return mu + eta * (tau + torch.log2(chosen_prob))


def post_temperature(
    p: torch.Tensor, temperature: float, min_temp: float, max_temp: float, temp_exponent: float
) -> torch.Tensor:
    """
    p ** (1/T), renormalised. With max_temp > min_temp, T is dynamic per row: min_temp + (max_temp - min_temp) *
    (H / log n) ** temp_exponent, H the entropy over the n live candidates.
    """
    if max_temp > min_temp:
        live = (p > 0).sum(dim=-1).to(p.dtype)
        max_entropy = live.log()
        max_entropy = torch.where(max_entropy == 0, torch.ones_like(max_entropy), max_entropy)
        temp = min_temp + (max_temp - min_temp) * torch.pow(_entropy(p) / max_entropy, temp_exponent)
        # a single live candidate has entropy 0, so min_temp 0 gives T = 0 and 0 / 0 = NaN: keep T positive
        temp = temp.clamp(min=torch.finfo(p.dtype).tiny).unsqueeze(-1)
    else:
        temp = torch.full((p.shape[0], 1), float(temperature), dtype=p.dtype, device=p.device)
    logp = torch.where(p > 0, p.clamp(min=torch.finfo(p.dtype).tiny).log(), -math.inf)
    return torch.softmax(logp / temp, dim=-1)


def exclude_top_choices(
    p: torch.Tensor, ids: torch.Tensor, eligible: torch.Tensor, fire: torch.Tensor, threshold: float
) -> torch.Tensor:
    """
    XTC. In rows where `fire` (b,) is set and at least two eligible candidates have p >= threshold, remove all
    of those except the least likely one. `eligible` (V,) is False for ids XTC must leave alone.
    """
    over = (p >= threshold) & (p > 0) & eligible[ids]
    count = over.sum(dim=-1, keepdim=True)
    least_likely = over & (over.cumsum(dim=-1) == count)
    remove = over & ~least_likely & (count >= 2) & fire.unsqueeze(-1)
    return renormalise(torch.where(remove, torch.zeros_like(p), p))


def draw(p: torch.Tensor, uniform: torch.Tensor, skew: float) -> torch.Tensor:
    """
    Inverse-CDF draw over the sorted candidates: the first position whose cumulative probability reaches
    uniform * total. Skew bends the draw, uniform ** exp(-skew), towards the tail (skew > 0) or the head.
    Returns positions (b,).
    """
    if skew != 0:
        uniform = torch.pow(uniform, math.exp(-skew))
    cum = p.cumsum(dim=-1)
    target = (uniform * cum[:, -1]).unsqueeze(-1)
    pos = (cum < target).sum(dim=-1)
    last_live = (p > 0).sum(dim=-1) - 1
    return torch.minimum(pos, last_live)
