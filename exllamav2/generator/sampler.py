"""ExLlamaV2Sampler: turns one step of logits into the next token, in plain torch, vectorised over the batch."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from exllamav2.generator import sampler_stages as stages
from exllamav2.generator.sampler_penalties import (
    apply_repetition_penalties,
    default_dry_breakers,
    default_xtc_ignored,
    dry_penalty,
    token_mask,
)
from exllamav2.generator.sampler_settings import ExLlamaV2SamplerSettings

# Stands in for "no tensor" in return values, as in the original
none_tensor = torch.empty((1, 1), device="meta")

# The original bans blocked tokens with a very low but finite logit, so a row whose filter allows only blocked
# tokens still yields one of them
_BLOCKED_LOGIT = -1e30


class ExLlamaV2Sampler:

    Settings = ExLlamaV2SamplerSettings

    @staticmethod
    def get_dry_default_sequence_breaker_tokens(tokenizer) -> set[int]:
        return set(default_dry_breakers(tokenizer))

    @staticmethod
    def get_default_xtc_mask_tokens(tokenizer) -> frozenset[int]:
        return default_xtc_ignored(tokenizer)

    @staticmethod
    def sample(
        logits: torch.Tensor,
        settings: ExLlamaV2SamplerSettings,
        sequence_ids: torch.Tensor | None,
        random: float | Sequence[float] | torch.Tensor,
        tokenizer,
        prefix_token: torch.Tensor | None = None,
        return_top_tokens: int = 0,
        blocked_tokens: list[int] | None = None,
        filters: list | None = None,
        filter_prefer_eos: bool = False,
        sync: bool = False,
    ):
        """
        Sample one token per batch row.

        :param logits: (batch, 1, vocab) float logits, any float dtype (computed in fp32, never modified)
        :param settings: ExLlamaV2Sampler.Settings (mirostat state is kept in it)
        :param sequence_ids: (batch, seq_len) token history for the penalties and DRY, or None
        :param random: uniform draw in [0, 1), or one per row; a single draw for batch > 1 is expanded
            deterministically into one per row
        :param tokenizer: used for the vocabulary size and token pieces; may be None when nothing needs it
        :param prefix_token: (batch, 1) ids; restrict each row to tokens whose piece starts with that token's
            piece (token healing)
        :param return_top_tokens: number of top candidates to return from the final distribution
        :param blocked_tokens: ids banned for this step
        :param filters: ExLlamaV2Filter list (batch 1 only); the sample is restricted to the ids all of them pass
        :param filter_prefer_eos: pick EOS as soon as the filters allow it
        :param sync: synchronise CUDA first

        :return: (tokens (batch, 1) long, top tokens (batch, 1, k) long or none_tensor, top probs (batch, 1, k)
            float or none_tensor, probs of the sampled tokens (batch, 1) float, True if a filter's end token was
            sampled)
        """
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != 1:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"ExLlamaV2Sampler.sample: logits must be a (batch, 1, vocab) tensor, got {shape}")
        if not logits.is_floating_point():
            raise ValueError(f"ExLlamaV2Sampler.sample: logits must be floating point, got {logits.dtype}")
        filters = filters or []
        if sync and logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        if (not filters and prefix_token is None and not return_top_tokens and not blocked_tokens
                and _plain_greedy(settings, sequence_ids) and isinstance(random, (float, int))):
            if not 0.0 <= random <= 1.0:
                raise ValueError(f"ExLlamaV2Sampler.sample: random draws must lie in [0, 1), got {[random]}")
            if sequence_ids is None or sequence_ids.shape[0] >= logits.shape[0]:
                return _greedy(logits, tokenizer)

        device = logits.device
        scores = logits[:, 0, :].to(torch.float32, copy=True).contiguous()
        batch, vocab = scores.shape

        if settings.cfg_scale is not None:
            if batch != 2:
                raise ValueError(f"ExLlamaV2Sampler.sample: cfg_scale needs logits of batch 2, got batch {batch}")
            mixed = torch.log_softmax(scores, dim=-1)
            scores = (settings.cfg_scale * mixed[0] + (1 - settings.cfg_scale) * mixed[1]).unsqueeze(0)
            batch = 1
        if filters and batch != 1:
            raise ValueError(f"ExLlamaV2Sampler.sample: filters need batch size 1, got {batch}")
        if prefix_token is not None and tuple(prefix_token.shape) != (batch, 1):
            raise ValueError(f"ExLlamaV2Sampler.sample: prefix_token must be ({batch}, 1), "
                             f"got {tuple(prefix_token.shape)}")

        history = _history(sequence_ids, batch)
        uniforms = _uniforms(random, batch, device)

        # Penalties, bans and biases on the logits

        if history is not None and (settings.token_repetition_penalty != 1.0
                                    or settings.token_frequency_penalty != 0.0
                                    or settings.token_presence_penalty != 0.0):
            scores = apply_repetition_penalties(
                scores, history.to(device), settings.token_repetition_penalty, settings.token_repetition_range,
                settings.token_repetition_decay, settings.token_frequency_penalty, settings.token_presence_penalty,
            )

        if blocked_tokens:
            scores[:, _valid_ids(blocked_tokens, vocab, "blocked_tokens")] = _BLOCKED_LOGIT

        if settings.token_bias is not None:
            bias = settings.token_bias.to(device=device, dtype=torch.float32).flatten()
            n = min(bias.shape[0], vocab)
            scores[:, :n] += bias[:n]

        if settings.dry_multiplier > 0.0 and history is not None:
            scores = _apply_dry(scores, history.to(device), settings, tokenizer)

        # Masks: filters, token healing, tokenizer vocabulary

        allowed = None
        end_tokens = None
        mask_filters = [f for f in filters if _masks_logits(f)]
        if mask_filters:
            # filters that mask logits themselves (generator/grammar/): their masks are built beside the forward
            # and applied here, on the logits' device
            for f in mask_filters:
                scores = f.mask_logits(scores)
            end_tokens = set().union(*(f.end_token_ids() for f in mask_filters))
            filters = [f for f in filters if not _masks_logits(f)]
            eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
            if filter_prefer_eos and eos is not None and eos < vocab and not bool(torch.isneginf(scores[0, eos])):
                keep = scores[:, eos].clone()
                scores.fill_(float("-inf"))
                scores[:, eos] = keep
        if filters:
            pass_tokens, set_end_tokens = _combine_filters(filters)
            if set_end_tokens is not None:
                end_tokens = set_end_tokens if end_tokens is None else end_tokens | set_end_tokens
            if pass_tokens is not None:
                if not pass_tokens:
                    raise ValueError("ExLlamaV2Sampler.sample: the filters exclude every token")
                if len(pass_tokens) == 1 and return_top_tokens == 0 and prefix_token is None:
                    token = next(iter(pass_tokens))
                    return (torch.tensor([[token]], dtype=torch.long), none_tensor, none_tensor,
                            torch.tensor([[1.0]], dtype=torch.float), token in (end_tokens or ()))
                eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
                if filter_prefer_eos and eos is not None and eos in pass_tokens:
                    pass_tokens = {eos}
                allowed = token_mask(pass_tokens, vocab, device).unsqueeze(0)

        if prefix_token is not None:
            healing = torch.stack([_ids_extending_piece(tokenizer, int(t), vocab).to(device)
                                   for t in prefix_token[:, 0].tolist()])
            allowed = healing if allowed is None else allowed & healing

        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        if tokenizer is not None:
            vocab_size = tokenizer.get_vocab_size()
            if vocab_size < vocab:
                scores[:, vocab_size:] = float("-inf")

        greedy = settings.temperature < 0.01 or settings.top_k == 1
        if greedy:
            # argmax takes a NaN as the maximum and returns 0 for a row of -inf: its value alone tells a dead row
            ids = scores.argmax(dim=-1, keepdim=True)
            best = scores.gather(-1, ids)[:, 0]
            dead_rows = torch.isneginf(best) | torch.isnan(best)
        else:
            dead_rows = torch.isneginf(scores).all(dim=-1) | torch.isnan(scores).any(dim=-1)
        _refuse_dead_rows(dead_rows)

        mu = None
        if settings.mirostat:
            if settings.mirostat_mu is None or len(settings.mirostat_mu) != batch:
                settings.mirostat_mu = [0.0] * batch
            mu = torch.tensor(settings.mirostat_mu, dtype=torch.float32, device=device)
            mu = torch.where(mu == 0, torch.full_like(mu, 2 * settings.mirostat_tau), mu)

        # Probabilities

        if greedy:
            probs = torch.ones_like(ids, dtype=torch.float32)
            pos = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            probs, ids = _truncated_distribution(scores, settings, mu)
            if settings.xtc_probability > 0.0:
                fire, uniforms = _split_uniform(uniforms, settings.xtc_probability)
                eligible = ~token_mask(_xtc_ignored(settings, tokenizer), vocab, device)
                probs = stages.exclude_top_choices(probs, ids, eligible, fire, settings.xtc_threshold)
            pos = stages.draw(probs, uniforms, settings.skew)

        tokens = ids.gather(-1, pos.unsqueeze(-1))
        token_probs = probs.gather(-1, pos.unsqueeze(-1))

        if mu is not None:
            mu = stages.mirostat_update(mu, token_probs[:, 0], settings.mirostat_tau, settings.mirostat_eta)
            settings.mirostat_mu = mu.tolist()

        if return_top_tokens > 0:
            top_tokens, top_probs = _top_candidates(probs, ids, vocab, return_top_tokens)
        else:
            top_tokens, top_probs = none_tensor, none_tensor

        tokens, token_probs = tokens.cpu(), token_probs.cpu()
        end_filter = end_tokens is not None and tokens[0, 0].item() in end_tokens
        if mask_filters and not end_filter:
            end_filter = any(f.ends_with(tokens[0, 0].item()) for f in mask_filters if hasattr(f, "ends_with"))
        return tokens, top_tokens, top_probs, token_probs, end_filter


def _plain_greedy(settings: ExLlamaV2SamplerSettings, sequence_ids) -> bool:
    """Greedy with nothing that changes the logits first: the argmax of the raw logits is the token."""
    s = settings
    if sequence_ids is not None and not (isinstance(sequence_ids, torch.Tensor) and sequence_ids.dim() == 2):
        return False  # the general path names what is wrong with it
    penalties = sequence_ids is not None and sequence_ids.shape[-1] > 0 and (
        s.token_repetition_penalty != 1.0 or s.token_frequency_penalty != 0.0 or s.token_presence_penalty != 0.0
        or s.dry_multiplier > 0.0)
    return ((s.temperature < 0.01 or s.top_k == 1) and s.cfg_scale is None and s.token_bias is None
            and not s.mirostat and not penalties)


def _greedy(logits: torch.Tensor, tokenizer):
    """sample()'s result for plain greedy settings, without copying the logits to fp32 (the argmax and its ties are
    the same in any float dtype): ids past the tokenizer's vocabulary are never picked, a row whose best logit is
    -inf or NaN is refused, and the sampled token's probability is 1, as on the general path."""
    scores = logits[:, 0, :]
    if tokenizer is not None:
        scores = scores[:, :tokenizer.get_vocab_size()]
    ids = scores.argmax(dim=-1, keepdim=True)
    best = scores.gather(-1, ids)[:, 0]
    _refuse_dead_rows(torch.isneginf(best) | torch.isnan(best))
    return ids.cpu(), none_tensor, none_tensor, torch.ones(ids.shape, dtype=torch.float32), False


def _refuse_dead_rows(dead_rows: torch.Tensor) -> None:
    if bool(dead_rows.any()):
        rows = dead_rows.nonzero().flatten().tolist()
        raise ValueError(f"ExLlamaV2Sampler.sample: no token can be sampled in batch row(s) {rows} "
                         f"(all masked, or NaN logits)")


def _history(sequence_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if sequence_ids is None:
        return None
    if not isinstance(sequence_ids, torch.Tensor) or sequence_ids.dim() != 2:
        raise ValueError("ExLlamaV2Sampler.sample: sequence_ids must be a (batch, seq_len) tensor, got "
                         f"{tuple(sequence_ids.shape) if isinstance(sequence_ids, torch.Tensor) else sequence_ids!r}")
    if sequence_ids.shape[0] < batch:
        raise ValueError(f"ExLlamaV2Sampler.sample: sequence_ids has {sequence_ids.shape[0]} rows, "
                         f"logits need {batch}")
    if sequence_ids.shape[1] == 0:
        return None
    # with CFG the rows share one history; use the first
    return sequence_ids[:batch].long()


def _uniforms(random, batch: int, device) -> torch.Tensor:
    if isinstance(random, torch.Tensor):
        values = random.flatten().tolist()
    elif isinstance(random, (list, tuple)):
        values = [float(r) for r in random]
    else:
        values = [float(random)]
    if not all(0.0 <= r <= 1.0 for r in values):
        raise ValueError(f"ExLlamaV2Sampler.sample: random draws must lie in [0, 1), got {values}")
    if len(values) == 1 and batch > 1:
        # one draw for the whole batch: seed the other rows' draws from it, so a seeded run repeats
        gen = torch.Generator().manual_seed(int(values[0] * 2**53))
        values += torch.rand(batch - 1, generator=gen, dtype=torch.float64).tolist()
    if len(values) != batch:
        raise ValueError(f"ExLlamaV2Sampler.sample: got {len(values)} random draws for batch size {batch}")
    return torch.tensor(values, dtype=torch.float32, device=device)


def _split_uniform(u: torch.Tensor, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform draw gives two independent ones: whether an event of `probability` happens, and a fresh
    uniform rescaled from the part of [0, 1) that decided it."""
    if probability >= 1.0:
        return torch.ones_like(u, dtype=torch.bool), u
    fire = u < probability
    rest = torch.where(fire, u / probability, (u - probability) / (1.0 - probability))
    return fire, rest.clamp(0.0, 1.0)


def _valid_ids(ids, vocab: int, what: str) -> list[int]:
    ids = list(ids)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"ExLlamaV2Sampler.sample: {what} holds ids outside [0, {vocab}): {bad[:8]}")
    return ids


def _masks_logits(f) -> bool:
    return bool(getattr(f, "can_mask_logits", lambda: False)()) and hasattr(f, "mask_logits")


def _combine_filters(filters) -> tuple[set[int] | None, set[int] | None]:
    pass_tokens = None
    end_tokens = None
    for f in filters:
        pt, et = f.get_next() if hasattr(f, "get_next") else f.next()
        if pt is None:
            continue
        pt = set(pt)
        et = set(et) if et is not None else set()
        pass_tokens = pt if pass_tokens is None else pass_tokens & pt
        end_tokens = et if end_tokens is None else end_tokens | et
    return pass_tokens, end_tokens


def _apply_dry(scores: torch.Tensor, history: torch.Tensor, settings, tokenizer) -> torch.Tensor:
    vocab = scores.shape[-1]
    if settings.dry_sequence_breakers is not None:
        breakers = token_mask(settings.dry_sequence_breakers, vocab, scores.device)
    elif tokenizer is not None:
        breakers = _default_breaker_mask(tokenizer, vocab).to(scores.device)
    else:
        breakers = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
    actual_vocab = tokenizer.get_vocab_size() if tokenizer is not None else vocab
    scores = scores.clone()
    # DRY matches n-grams within each row's own history, so it runs row by row
    for row in range(scores.shape[0]):
        penalty = dry_penalty(history[row], breakers, min(actual_vocab, vocab), settings.dry_allowed_length,
                              settings.dry_base, settings.dry_multiplier, settings.dry_max_ngram, settings.dry_range)
        if penalty is not None:
            scores[row, :penalty.shape[0]] -= penalty
    return scores


@lru_cache(maxsize=10)
def _default_breaker_mask(tokenizer, vocab: int) -> torch.Tensor:
    return token_mask(default_dry_breakers(tokenizer), vocab, "cpu")


def _xtc_ignored(settings, tokenizer):
    if settings.xtc_ignore_tokens is not None:
        return settings.xtc_ignore_tokens
    return default_xtc_ignored(tokenizer) if tokenizer is not None else ()


@lru_cache(maxsize=4096)
def _ids_extending_piece(tokenizer, token: int, vocab: int) -> torch.Tensor:
    """Bool (vocab,): ids whose piece starts with the piece of `token` (token healing)."""
    if tokenizer is None:
        raise ValueError("ExLlamaV2Sampler.sample: prefix_token needs a tokenizer")
    pieces = tokenizer.get_id_to_piece_list(True)
    prefix = pieces[token]
    return token_mask([i for i, p in enumerate(pieces[:vocab]) if p.startswith(prefix)], vocab, "cpu")


def _truncated_distribution(scores: torch.Tensor, settings, mu: torch.Tensor | None):
    """Softmax and the truncation stages, in the original's order. Returns sorted (probs, ids), (b, n)."""
    s = settings
    probs = stages.softmax_with_temperature(scores, 1.0 if s.temperature_last else s.temperature, s.smoothing_factor)
    p, ids = stages.sorted_candidates(probs, s.top_k)
    if 0.0 < s.top_p < 1.0:
        p = stages.top_p(p, s.top_p)
    if s.top_a > 0.0:
        p = stages.top_a(p, s.top_a)
    if 0.0 < s.min_p < 1.0:
        p = stages.min_p(p, s.min_p)
    if 0.0 < s.tfs < 1.0:
        p = stages.tail_free(p, s.tfs)
    if 0.0 < s.typical < 1.0:
        p, ids = stages.typical(p, ids, s.typical)
    if mu is not None:
        p = stages.mirostat_truncate(p, mu)
    post_temp = s.temperature if s.temperature_last else 1.0
    if post_temp != 1.0 or s.max_temp > s.min_temp:
        p = stages.post_temperature(p, post_temp, s.min_temp, s.max_temp, s.temp_exponent)
    return p, ids


def _top_candidates(probs: torch.Tensor, ids: torch.Tensor, vocab: int, k: int):
    """The k most likely tokens of the final distribution; past the live candidates, the lowest other ids with
    probability 0 (as the original)."""
    if k > vocab:
        raise ValueError(f"ExLlamaV2Sampler.sample: return_top_tokens={k} exceeds the vocabulary ({vocab})")
    full = torch.zeros(probs.shape[0], vocab, dtype=probs.dtype, device=probs.device).scatter(-1, ids, probs)
    top_probs, top_ids = torch.sort(full, dim=-1, descending=True, stable=True)
    return top_ids[:, :k].unsqueeze(1).cpu(), top_probs[:, :k].unsqueeze(1).cpu()
