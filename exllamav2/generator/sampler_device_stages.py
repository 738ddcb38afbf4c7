"""
The sampler's stages with per-row settings held in device tensors, for the sync-free sampling path
(sampler_device.py). Each stage is the host stage of sampler_stages.py / sampler_penalties.py with its scalar
setting replaced by a (b, 1) tensor and an enable mask per row: a row whose stage is off keeps its values
untouched (not even renormalised), so a row computes what the host path computes for its own settings.

Nothing here reads a tensor's value on the host (no `.item()`, `.tolist()`, boolean indexing or `nonzero`):
data-dependent choices are `torch.where` over fixed shapes. Histories are (b, n) left-padded with -1, so the
newest token of every row is in the last column whatever the other rows' lengths.
"""
from __future__ import annotations

import math

import torch

from . import sampler_stages as host_stages

# "no range limit" for the repetition penalty, as a distance no history reaches
_NO_LIMIT = 1 << 40


def _keep(p: torch.Tensor, keep: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    """sampler_stages._keep for the rows where `enabled` (b, 1); other rows are returned as they are."""
    keep = keep.clone()
    keep[:, 0].fill_(True)  # (an assignment of a Python bool would build a tensor from it: a host step)
    kept = torch.where(keep, p, torch.zeros_like(p))
    return torch.where(enabled, kept / kept.sum(dim=-1, keepdim=True), p)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    return -(p * logp).sum(dim=-1)


# ---------------------------------------------------------------- penalties on the logits


def repetition_penalties(scores: torch.Tensor, history: torch.Tensor, rep: torch.Tensor, rng: torch.Tensor,
                         decay: torch.Tensor, freq: torch.Tensor, pres: torch.Tensor) -> torch.Tensor:
    """
    sampler_penalties.apply_repetition_penalties per row, sync-free. scores (b, V) fp32; history (b, n) long,
    left-padded with -1; rep, freq, pres (b, 1) fp32; rng (b, 1) long (-1: the whole history); decay (b, 1) long.
    Rows with rep 1, freq 0 and pres 0 come back unchanged. As on the host, the work is over the history, not the
    vocabulary: one sort groups each row's positions by token, newest first. The frequency penalty is subtracted
    once as freq * (occurrences, faded), where the host path subtracts it once per occurrence (equal up to
    rounding); occurrences and fade numerators are summed as integers, so the result never depends on an order.
    """
    b, vocab = scores.shape
    n = history.shape[1]
    dev = scores.device
    dist = torch.arange(n - 1, -1, -1, device=dev).expand(b, n)
    sustain = torch.where(rng < 0, torch.full_like(rng, _NO_LIMIT), rng)
    valid = (history >= 0) & (history < vocab) & (dist < sustain + decay)
    # sort by (token, distance): invalid positions get the token `vocab` and sort last
    token = torch.where(valid, history, torch.full_like(history, vocab))
    key, _ = torch.sort(token * (n + 1) + dist, dim=-1)
    token, dist = key // (n + 1), key % (n + 1)
    index = torch.arange(n, device=dev).expand(b, n)
    first = torch.ones_like(token, dtype=torch.bool)
    first[:, 1:] = token[:, 1:] != token[:, :-1]
    # each group's end: the next group's first position (a reversed running minimum)
    starts = torch.where(first, index, torch.full_like(index, n))
    next_start = torch.cat((starts[:, 1:], torch.full_like(starts[:, :1], n)), 1).flip(-1).cummin(-1).values.flip(-1)
    count = next_start - index
    over = (dist - sustain).clamp(min=0)
    over_sum = torch.cat((torch.zeros_like(over[:, :1]), over.cumsum(-1)), 1)
    faded = over_sum.gather(1, next_start) - over_sum.gather(1, index)

    decay_f = decay.clamp(min=1).to(torch.float32)
    fade = torch.where(decay > 0, over.to(torch.float32) / decay_f, torch.zeros_like(dist, dtype=torch.float32))
    rep_s = rep + fade * (1.0 - rep)
    pres_s = pres * (1.0 - fade)
    weight = count.to(torch.float32) - torch.where(decay > 0, faded.to(torch.float32) / decay_f,
                                                   torch.zeros_like(fade))
    live = first & (token < vocab)
    col = torch.where(live, token, torch.full_like(token, vocab))
    before = scores.gather(1, col.clamp(max=vocab - 1))
    after = torch.where(before > 0, before / rep_s, before * rep_s) - pres_s
    after = torch.where(count > 0, after - freq * weight, after)
    # one spare column takes the writes of positions that are not a token's newest occurrence
    out = torch.cat((scores, scores.new_zeros(b, 1)), 1).scatter(1, col, after)
    return out[:, :vocab]


def dry_penalties(scores: torch.Tensor, history: torch.Tensor, breakers: torch.Tensor, vocab_size: int,
                  allowed: torch.Tensor, base: torch.Tensor, multiplier: torch.Tensor, max_ngram: torch.Tensor,
                  dry_range: torch.Tensor, max_ngram_bound: int) -> torch.Tensor:
    """
    sampler_penalties.dry_penalty for every row at once, sync-free. history (b, n) left-padded with -1;
    breakers (b, V) bool; allowed, max_ngram, dry_range (b, 1) long (dry_range 0: the whole history); base,
    multiplier (b, 1) fp32 (multiplier 0: the row is left alone). The suffix is matched for up to
    `max_ngram_bound` (the largest max_ngram of the rows, a host int) tokens, each row stopping at its own.
    """
    b, n = history.shape
    if n < 2:
        return scores
    dist = torch.arange(n - 1, -1, -1, device=scores.device).unsqueeze(0)
    # tokens beyond a row's range are as absent as the padding
    seq = torch.where((dry_range > 0) & (dist >= dry_range), torch.full_like(history, -1), history)
    in_vocab = (seq >= 0) & (seq < vocab_size)
    is_breaker = ~in_vocab | breakers.gather(1, seq.clamp(0, breakers.shape[1] - 1))

    ends = torch.arange(n - 1, device=scores.device).unsqueeze(0)
    match_len = torch.zeros(b, n - 1, dtype=torch.long, device=scores.device)
    alive = torch.ones(b, n - 1, dtype=torch.bool, device=scores.device)
    stopped = torch.zeros(b, 1, dtype=torch.bool, device=scores.device)
    for k in range(1, min(max_ngram_bound, n - 1) + 1):
        stopped = stopped | is_breaker[:, n - k:n - k + 1] | (max_ngram < k)
        src = ends - k + 1
        same = seq.gather(1, src.clamp(min=0).expand(b, -1)) == seq[:, n - k:n - k + 1]
        alive = alive & (src >= 0) & same & ~stopped
        match_len = match_len + alive.to(torch.long)

    candidates = seq[:, 1:]
    hit = (match_len >= allowed) & ~is_breaker[:, 1:] & (multiplier > 0)
    exponent = (match_len - allowed).to(torch.float32)
    penalty = torch.where(hit, multiplier * torch.pow(base, exponent), torch.zeros_like(exponent))
    col = torch.where(hit, candidates, torch.full_like(candidates, vocab_size))
    out = torch.zeros(b, vocab_size + 1, dtype=torch.float32, device=scores.device)
    out = out.scatter_reduce(1, col, penalty, reduce="amax", include_self=True)[:, :vocab_size]
    scores = scores.clone()
    scores[:, :vocab_size] -= out
    return scores


# ---------------------------------------------------------------- the distribution


def softmax_with_temperature(logits: torch.Tensor, temperature: torch.Tensor,
                             smoothing: torch.Tensor) -> torch.Tensor:
    """ops/torch_ref/sampling.softmax_temperature with a temperature and smoothing factor per row (b, 1)."""
    top = logits.max(dim=-1, keepdim=True).values
    shifted = logits - top
    smooth = smoothing > 0
    shifted = torch.where(smooth, -shifted * shifted, shifted)
    temperature = torch.where(smooth, temperature / torch.where(smooth, smoothing, torch.ones_like(smoothing)),
                              temperature)
    return torch.softmax(shifted / temperature, dim=-1)


def sorted_candidates(probs: torch.Tensor, top_k: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The `width` most likely ids of each row, sorted descending with ties by the lower id (as the host path's
    stable sort), then each row with 0 < top_k < vocabulary cut to its own top_k and renormalised. `width` is
    the vocabulary, or the largest top_k when every row has one (a host int, from the settings). Returns fp64
    probabilities.
    """
    vocab = probs.shape[-1]
    if width < vocab:
        p, ids = torch.topk(probs, width, dim=-1, sorted=True)
        order = torch.argsort(ids, dim=-1)  # topk's order among equal values is unspecified: follow the id
        p, ids = p.gather(-1, order), ids.gather(-1, order)
        order = torch.argsort(p, dim=-1, descending=True, stable=True)
        p, ids = p.gather(-1, order), ids.gather(-1, order)
    else:
        p, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    # the candidates are held in fp64 from here: `width` depends on the other rows' settings, and a sum over
    # more trailing zeros may round differently in fp32 (a row's result would then depend on its batch); in fp64
    # such differences vanish when the probabilities are rounded back
    p = p.double()
    cut = (top_k > 0) & (top_k < vocab)
    within = torch.arange(p.shape[-1], device=p.device).unsqueeze(0) < top_k
    return _keep(p, within, cut), ids


def top_p(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _keep(p, p.cumsum(dim=-1) <= value, (value > 0) & (value < 1))


def top_a(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _keep(p, p >= value * p[:, :1] * p[:, :1], value > 0)


def min_p(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _keep(p, p >= value * p[:, :1], (value > 0) & (value < 1))


def tail_free(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sampler_stages.tail_free per row (rows with tfs outside (0, 1) are left alone)."""
    keep = host_stages.tail_free_keep(p, value)
    return p if keep is None else _keep(p, keep, (value > 0) & (value < 1))


def typical(p: torch.Tensor, ids: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler_stages.typical per row: may drop the most likely candidate, so enabled rows are re-sorted."""
    enabled = (value > 0) & (value < 1)
    keep = host_stages.typical_keep(p, value)
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum(dim=-1, keepdim=True)
    resort = torch.argsort(q, dim=-1, descending=True, stable=True)
    return torch.where(enabled, q.gather(-1, resort), p), torch.where(enabled, ids.gather(-1, resort), ids)


def mirostat_truncate(p: torch.Tensor, mu: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    return _keep(p, p >= torch.pow(2.0, -mu), enabled)


def post_temperature(p: torch.Tensor, temperature: torch.Tensor, min_temp: torch.Tensor, max_temp: torch.Tensor,
                     temp_exponent: torch.Tensor) -> torch.Tensor:
    """sampler_stages.post_temperature per row: on where the temperature is not 1 or dynamic (max > min)."""
    dynamic = max_temp > min_temp
    live = (p > 0).sum(dim=-1, keepdim=True).to(p.dtype)
    max_entropy = live.log()
    max_entropy = torch.where(max_entropy == 0, torch.ones_like(max_entropy), max_entropy)
    dyn_temp = min_temp + (max_temp - min_temp) * torch.pow(_entropy(p).unsqueeze(-1) / max_entropy, temp_exponent)
    dyn_temp = dyn_temp.clamp(min=torch.finfo(p.dtype).tiny)  # as the host stage: T = 0 would give 0 / 0
    temp = torch.where(dynamic, dyn_temp, temperature)
    logp = torch.where(p > 0, p.clamp(min=torch.finfo(p.dtype).tiny).log(), -math.inf)
    return torch.where(dynamic | (temperature != 1.0), torch.softmax(logp / temp, dim=-1), p)


def split_uniform(u: torch.Tensor, probability: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler._split_uniform per row; rows with probability 0 (XTC off) keep their draw."""
    safe = probability.clamp(min=1e-30, max=1.0)
    fire = (u < probability) | (probability >= 1.0)
    rest = torch.where(u < probability, u / safe, (u - probability) / (1.0 - probability).clamp(min=1e-30))
    rest = torch.where(probability >= 1.0, u, rest.clamp(0.0, 1.0))
    on = probability > 0
    return fire & on, torch.where(on, rest, u)


def exclude_top_choices(p: torch.Tensor, ids: torch.Tensor, eligible: torch.Tensor, fire: torch.Tensor,
                        threshold: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    """sampler_stages.exclude_top_choices with `eligible` (b, V) and fire, threshold, enabled (b, 1); rows with
    XTC off are left alone (the host path renormalises every row of its call, fired or not)."""
    over = (p >= threshold) & (p > 0) & eligible.gather(1, ids)
    count = over.sum(dim=-1, keepdim=True)
    least_likely = over & (over.cumsum(dim=-1) == count)
    remove = over & ~least_likely & (count >= 2) & fire
    q = torch.where(remove, torch.zeros_like(p), p)
    return torch.where(enabled, q / q.sum(dim=-1, keepdim=True), p)


def draw(p: torch.Tensor, uniform: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """sampler_stages.draw with uniform and skew (b, 1): positions (b,)."""
    uniform = torch.where(skew != 0, torch.pow(uniform, torch.exp(-skew)), uniform)
    cum = p.cumsum(dim=-1)
    target = uniform * cum[:, -1:]
    pos = (cum < target).sum(dim=-1)
    last_live = (p > 0).sum(dim=-1) - 1
    # a row without a live candidate (a dead row, flagged by the caller) still indexes in bounds
    return torch.minimum(pos, last_live).clamp(min=0)
