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
    logits (b, V) fp32, sequence_ids (b, n). Returns new logits.

    Looking back from the newest token, the full penalties hold over `penalty_range` tokens (-1: all), then fade
    linearly towards none over `penalty_decay` more tokens; older tokens are not penalised. The multiplicative
    repetition penalty (divide positive logits, multiply negative ones) and the presence penalty act once per
    token, at the strength of its newest occurrence; the frequency penalty is subtracted once per occurrence.
    """
    b, vocab = logits.shape
    n = sequence_ids.shape[-1]
    if n == 0:
        return logits
    sustain = n if penalty_range == -1 else penalty_range
    # distance of each history position from the newest token
    dist = torch.arange(n - 1, -1, -1, device=logits.device)
    in_range = dist < sustain + penalty_decay
    if penalty_decay > 0:
        fade = (dist - sustain).clamp(min=0).to(torch.float32) / penalty_decay
    else:
        fade = torch.zeros(n, device=logits.device)
    rep_at = repetition_penalty + fade * (1.0 - repetition_penalty)
    freq_at = frequency_penalty * (1.0 - fade)
    pres_at = presence_penalty * (1.0 - fade)

    ids = sequence_ids.to(logits.device).long()
    valid = in_range.unsqueeze(0) & (ids >= 0) & (ids < vocab)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))

    freq_sum = torch.zeros_like(logits)
    freq_sum.scatter_add_(1, safe_ids, torch.where(valid, freq_at.expand(b, n), 0.0))

    never = n + sustain + penalty_decay + 1
    newest = torch.full((b, vocab), never, dtype=torch.long, device=logits.device)
    newest.scatter_reduce_(1, safe_ids, torch.where(valid, dist.expand(b, n), never), reduce="amin")
    seen = newest < never
    newest_pos = (n - 1 - newest).clamp(0, n - 1)
    rep = rep_at[newest_pos]
    pres = pres_at[newest_pos]
    penalised = torch.where(logits > 0, logits / rep, logits * rep) - pres
    return torch.where(seen, penalised, logits) - freq_sum


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
