"""Logit penalties computed from the token history: repetition/frequency/presence, and DRY."""
from __future__ import annotations

import re
from functools import lru_cache

import torch

_DRY_BREAKER_CHARS = re.compile(r"[.,!?<>\[\](){}\n\t\"]")
_XTC_IGNORED_CHARS = re.compile(r"\n")


def apply_repetition_penalties(
    logits: torch.Tensor,
    sequence_ids: torch.Tensor,
    repetition_penalty: float,
    penalty_range: int,
    penalty_decay: int,
    frequency_penalty: float,
    presence_penalty: float,
) -> torch.Tensor:
    """
    logits (b, V) fp32, modified in place and returned; sequence_ids (b, n).

    Looking back from the newest token, the full penalties hold over `penalty_range` tokens (-1: all), then fade
    linearly towards none over `penalty_decay` more tokens; older tokens are not penalised. The multiplicative
    repetition penalty (divide positive logits, multiply negative ones) and the presence penalty act once per
    token, at the strength of its newest occurrence; the frequency penalty is subtracted once per occurrence.
    """
    b, vocab = logits.shape
    n = sequence_ids.shape[-1]
    if n == 0:
        return logits
    device = logits.device
    sustain = n if penalty_range == -1 else penalty_range
    # distance of each history position from the newest token
    dist = torch.arange(n - 1, -1, -1, device=device).expand(b, n)
    ids = sequence_ids.to(device).long()
    valid = (dist < sustain + penalty_decay) & (ids >= 0) & (ids < vocab)
    rows = torch.arange(b, device=device).unsqueeze(1).expand(b, n)
    # work on the history only, never on the whole vocabulary: flat index of (row, token) per position
    key = (rows * vocab + ids)[valid]
    dist = dist[valid]
    if key.numel() == 0:
        return logits

    def strengths(d: torch.Tensor):
        if penalty_decay > 0:
            fade = (d - sustain).clamp(min=0).to(torch.float32) / penalty_decay
        else:
            fade = torch.zeros(d.shape, device=device)
        return (repetition_penalty + fade * (1.0 - repetition_penalty),
                frequency_penalty * (1.0 - fade), presence_penalty * (1.0 - fade))

    flat = logits.view(-1)
    # newest occurrence of each (row, token): sort by key, then distance, and take each key's first entry
    combined, _ = torch.sort(key * (n + 1) + dist)
    keys_sorted = combined // (n + 1)
    first = torch.ones_like(keys_sorted, dtype=torch.bool)
    first[1:] = keys_sorted[1:] != keys_sorted[:-1]
    newest_key = keys_sorted[first]
    rep, _, pres = strengths(combined[first] % (n + 1))
    before = flat[newest_key]
    flat[newest_key] = torch.where(before > 0, before / rep, before * rep) - pres

    _, freq, _ = strengths(dist)
    flat.index_add_(0, key, -freq)
    return logits


@lru_cache(maxsize=10)
def default_dry_breakers(tokenizer) -> frozenset[int]:
    """Ids whose piece holds one of .,!?<>[](){}\\n\\t\" plus the special tokens."""
    return _ids_matching(tokenizer, _DRY_BREAKER_CHARS)


@lru_cache(maxsize=10)
def default_xtc_ignored(tokenizer) -> frozenset[int]:
    """Ids whose piece holds a newline plus the special tokens."""
    return _ids_matching(tokenizer, _XTC_IGNORED_CHARS)


def _ids_matching(tokenizer, pattern: re.Pattern) -> frozenset[int]:
    pieces = tokenizer.get_id_to_piece_list(True)
    ids = {i for i, piece in enumerate(pieces) if pattern.search(piece)}
    ids |= set(getattr(tokenizer, "extended_id_to_piece", {}) or {})
    return frozenset(ids)


def token_mask(ids, size: int, device) -> torch.Tensor:
    """Bool (size,) with True at the given ids (ids outside [0, size) are ignored)."""
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    ids = [i for i in ids if 0 <= i < size]
    if ids:
        mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
    return mask


def dry_penalty(
    sequence: torch.Tensor,
    breaker_mask: torch.Tensor,
    vocab_size: int,
    allowed_length: int,
    base: float,
    multiplier: float,
    max_ngram: int,
    dry_range: int,
) -> torch.Tensor | None:
    """
    sequence (n,) token history of one row. Returns a (vocab_size,) penalty to subtract from the logits, or None.

    For every earlier position where the tokens before it repeat the newest tokens of the context (a suffix
    match of length L, at most max_ngram, not crossing a sequence breaker), the token that followed there would
    extend the repetition; it is penalised by multiplier * base ** (L - allowed_length) when L >= allowed_length,
    taking the longest match per token. Breaker tokens themselves are never penalised.
    """
    if dry_range > 0:
        sequence = sequence[-dry_range:]
    seq = sequence.long()
    n = seq.shape[0]
    if n < 2:
        return None
    in_vocab = (seq >= 0) & (seq < vocab_size)
    is_breaker = ~in_vocab | breaker_mask[seq.clamp(0, breaker_mask.shape[0] - 1)]

    # ends[j]: an earlier position whose match with the context's suffix ends at j (the candidate is seq[j + 1])
    ends = torch.arange(n - 1, device=seq.device)
    match_len = torch.zeros(n - 1, dtype=torch.long, device=seq.device)
    alive = torch.ones(n - 1, dtype=torch.bool, device=seq.device)
    for k in range(1, min(max_ngram, n - 1) + 1):
        if bool(is_breaker[n - k]):
            break
        src = ends - k + 1
        alive &= (src >= 0) & (seq[src.clamp(min=0)] == seq[n - k])
        if not bool(alive.any()):
            break
        match_len += alive.long()

    candidates = seq[1:]
    hit = (match_len >= allowed_length) & ~is_breaker[1:]
    if not bool(hit.any()):
        return None
    exponent = (match_len[hit] - allowed_length).to(torch.float32)
    penalties = multiplier * torch.pow(torch.tensor(base, dtype=torch.float32, device=seq.device), exponent)
    out = torch.zeros(vocab_size, dtype=torch.float32, device=seq.device)
    out.scatter_reduce_(0, candidates[hit], penalties, reduce="amax")
    return out
