"""
Sampling on the logits' device with no host sync: (b, vocab) logits and per-row settings held as device tensors
in, token ids (and their probabilities) out, every row with its own settings.

It computes what ExLlamaV2Sampler.sample (sampler.py, the host path) computes for each row's settings, in the
same order: repetition/frequency/presence penalties (with range and decay), blocked tokens, token bias, DRY, the
tokenizer's vocabulary mask, then greedy (temperature < 0.01 or top_k == 1: argmax, first maximum) or the
tempered softmax, top-k, top-p, top-a, min-p, tail-free, typical, mirostat, the post temperature (static or
dynamic), XTC and the skewed inverse-CDF draw. The per-row stages are in sampler_device_stages.py.

What stays on the host: filters and token healing (their masks come from host code each step), CFG (two rows of
logits make one), the top-k candidate lists of `return_top_tokens`. A caller sends a row that needs any of these
through the host path (`device_sampling_supported`, `ExLlamaV2SamplerSettings.needs_host`).

Random numbers: one uniform draw in [0, 1) per row, as the host path takes, given as a device tensor. A caller
holding each request's random draws on the host (the dynamic generator: each job's own seeded `random.Random`)
copies them in with the step's settings, so a request draws the same numbers whichever path samples it, alone or
batched. `counter_uniforms(seeds, counters)` draws them on the device instead, from a counter-based hash of each
row's (seed, counter), for callers that keep the whole step on the device.

Setting up (`DeviceSamplingParams.build`) reads the settings on the host and copies them to the device once per
step (no sync: a copy to the device does not wait for it); `sample_on_device` then never reads a device value on
the host, and `DeviceSample.to_host()` is the one transfer back (tokens, probabilities, mirostat mu, row checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from . import sampler_device_stages as ds
from .sampler_penalties import default_dry_breakers, default_xtc_ignored, token_mask
from .sampler_settings import ExLlamaV2SamplerSettings

# as sampler._BLOCKED_LOGIT: blocked tokens get a very low but finite logit
_BLOCKED_LOGIT = -1e30

# per-row float settings, in the order of the packed (fields, b) tensor copied to the device
_FLOAT_FIELDS = ("temperature", "smoothing_factor", "min_temp", "max_temp", "temp_exponent", "top_p", "top_a", "min_p",
                 "tfs", "typical", "skew", "xtc_probability", "xtc_threshold", "mirostat_tau", "mirostat_eta", "mu",
                 "token_repetition_penalty", "token_frequency_penalty", "token_presence_penalty", "dry_multiplier",
                 "dry_base", "greedy", "temperature_last", "mirostat", "first_temperature", "post_temperature")
_INT_FIELDS = ("top_k", "token_repetition_range", "token_repetition_decay", "dry_allowed_length", "dry_max_ngram",
               "dry_range")


def device_sampling_supported(settings: ExLlamaV2SamplerSettings, filters=None, return_top_tokens: int = 0,
                              prefix_token=None) -> bool:
    """Whether sample_on_device can sample a row with these settings and request options (else: the host path)."""
    return not (settings.needs_host or filters or return_top_tokens or prefix_token is not None)


def is_greedy(settings: ExLlamaV2SamplerSettings) -> bool:
    return settings.temperature < 0.01 or settings.top_k == 1


@dataclass
class DeviceSamplingParams:
    """Per-row settings on the device: `floats` (fields, b, 1) fp32 and `ints` (fields, b, 1) long, named by
    _FLOAT_FIELDS / _INT_FIELDS; optional (b, V) masks; the history (b, n) left-padded with -1. The host facts
    (greedy rows, the candidate width, which stages some row uses) choose which computations run: they depend on
    the settings only, never on the logits."""

    floats: torch.Tensor
    ints: torch.Tensor
    vocab_size: int
    token_bias: torch.Tensor | None = None
    blocked: torch.Tensor | None = None
    dry_breakers: torch.Tensor | None = None
    xtc_eligible: torch.Tensor | None = None
    history: torch.Tensor | None = None
    all_greedy: bool = False
    any_greedy: bool = False
    width: int = 0
    penalties: bool = False
    dry_ngram_bound: int = 0
    xtc: bool = False
    mirostat: bool = False

    def f(self, name: str) -> torch.Tensor:
        return self.floats[_FLOAT_FIELDS.index(name)]

    def i(self, name: str) -> torch.Tensor:
        return self.ints[_INT_FIELDS.index(name)]

    @property
    def batch(self) -> int:
        return self.floats.shape[1]

    @classmethod
    def build(cls, settings: Sequence[ExLlamaV2SamplerSettings], vocab: int, device, tokenizer=None,
              histories: Sequence[Sequence[int] | None] | None = None,
              blocked_tokens: Sequence[Sequence[int] | None] | None = None,
              mirostat_mu: Sequence[float | None] | None = None) -> DeviceSamplingParams:
        """
        :param settings: one Settings per row (the same object may serve several rows)
        :param vocab: the logits' width
        :param tokenizer: for the vocabulary size and the default DRY breakers / XTC-ignored ids; may be None
        :param histories: per row, the token history for the penalties and DRY (None: no history)
        :param blocked_tokens: per row, ids banned for this step
        :param mirostat_mu: per row, the mirostat state (None or 0: 2 * tau, as the host path starts)
        """
        b = len(settings)
        if b == 0:
            raise ValueError("DeviceSamplingParams.build: no rows")
        for s in settings:
            if not isinstance(s, ExLlamaV2SamplerSettings):
                raise ValueError(f"DeviceSamplingParams.build: settings must be ExLlamaV2Sampler.Settings, got "
                                 f"{type(s).__name__}")
            if s.needs_host:
                raise ValueError("DeviceSamplingParams.build: CFG (cfg_scale) needs the host path "
                                 "(ExLlamaV2Sampler.sample)")
        for name, seq in (("histories", histories), ("blocked_tokens", blocked_tokens), ("mirostat_mu", mirostat_mu)):
            if seq is not None and len(seq) != b:
                raise ValueError(f"DeviceSamplingParams.build: {name} has {len(seq)} rows, settings {b}")
        vocab_size = tokenizer.get_vocab_size() if tokenizer is not None else vocab
        vocab_size = min(vocab_size, vocab)

        rows_f, rows_i = [], []
        for r, s in enumerate(settings):
            mu = mirostat_mu[r] if mirostat_mu is not None else None
            if not mu:
                mu = 2 * s.mirostat_tau
            greedy = is_greedy(s)
            vals = {name: getattr(s, name, 0.0) for name in _FLOAT_FIELDS}
            # greedy rows never use the distribution: temperature 1 keeps their (discarded) values finite
            vals.update(mu=mu, greedy=float(greedy), temperature_last=float(s.temperature_last),
                        mirostat=float(bool(s.mirostat)),
                        first_temperature=1.0 if s.temperature_last or greedy else s.temperature,
                        post_temperature=s.temperature if s.temperature_last and not greedy else 1.0)
            rows_f.append([float(vals[name]) for name in _FLOAT_FIELDS])
            rows_i.append([int(getattr(s, name)) for name in _INT_FIELDS])
        floats = torch.tensor(rows_f, dtype=torch.float32).t().unsqueeze(-1)
        ints = torch.tensor(rows_i, dtype=torch.long).t().unsqueeze(-1)

        with_history = histories is not None and any(h is not None and len(h) for h in histories)
        penalties = with_history and any(
            s.token_repetition_penalty != 1.0 or s.token_frequency_penalty != 0.0 or s.token_presence_penalty != 0.0
            for s in settings)
        dry = with_history and any(s.dry_multiplier > 0.0 for s in settings)
        history = _history_tensor(settings, histories, penalties, dry) if penalties or dry else None

        greedy = [is_greedy(s) for s in settings]
        top_ks = [s.top_k for s in settings]
        width = max(top_ks) if all(0 < k < vocab for k in top_ks) else vocab

        params = cls(
            floats=floats.to(device, non_blocking=True), ints=ints.to(device, non_blocking=True),
            vocab_size=vocab_size, all_greedy=all(greedy), any_greedy=any(greedy), width=width,
            penalties=penalties, dry_ngram_bound=max(s.dry_max_ngram for s in settings) if dry else 0,
            xtc=any(s.xtc_probability > 0.0 and not g for s, g in zip(settings, greedy)),
            mirostat=any(s.mirostat for s in settings))
        if history is not None:
            params.history = history.to(device, non_blocking=True)
        if any(s.token_bias is not None for s in settings):
            params.token_bias = torch.stack([_bias_row(s.token_bias, vocab) for s in settings]).to(device)
        if blocked_tokens is not None and any(blocked_tokens):
            mask = torch.zeros(b, vocab, dtype=torch.bool)
            for r, ids in enumerate(blocked_tokens):
                ids = list(ids or ())
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"DeviceSamplingParams.build: blocked_tokens of row {r} holds ids outside "
                                     f"[0, {vocab}): {bad[:8]}")
                mask[r, ids] = True
            params.blocked = mask.to(device, non_blocking=True)
        if dry:
            params.dry_breakers = torch.stack([_breaker_mask(s, tokenizer, vocab, str(device)) for s in settings])
        if params.xtc:
            params.xtc_eligible = torch.stack([~_xtc_ignored_mask(s, tokenizer, vocab, str(device))
                                               for s in settings])
        return params


@dataclass
class DeviceSample:
    """The result of sample_on_device, on the device: tokens (b,) long, probs (b,) fp32 (the sampled token's
    probability in the final distribution; 1 for greedy rows), mu (b,) fp32 (mirostat rows' new state), ok (b,)
    bool (False: nothing could be sampled in the row, every token masked or NaN logits)."""

    tokens: torch.Tensor
    probs: torch.Tensor
    mu: torch.Tensor
    ok: torch.Tensor

    def to_host(self) -> tuple[list[int], list[float], list[float], list[bool]]:
        """One transfer to the host: (tokens, probs, mu, ok) as lists."""
        packed = torch.stack((self.tokens.double(), self.probs.double(), self.mu.double(), self.ok.double()))
        tokens, probs, mu, ok = packed.cpu().tolist()
        return [int(t) for t in tokens], probs, mu, [bool(o) for o in ok]


def sample_on_device(logits: torch.Tensor, params: DeviceSamplingParams, uniforms: torch.Tensor) -> DeviceSample:
    """
    One token per row of `logits` (b, V), on its device, without a host sync.

    :param logits: (b, V) float logits (not modified)
    :param params: DeviceSamplingParams.build(...) for these rows, on the logits' device
    :param uniforms: (b,) draws in [0, 1) on the logits' device (a row's own draw decides its token)
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"sample_on_device: logits must be a (batch, vocab) float tensor, got {shape}")
    b, vocab = logits.shape
    if params.batch != b:
        raise ValueError(f"sample_on_device: params are for {params.batch} rows, logits have {b}")
    if tuple(uniforms.shape) != (b,):
        raise ValueError(f"sample_on_device: uniforms must be ({b},), got {tuple(uniforms.shape)}")
    if uniforms.device != logits.device or params.floats.device != logits.device:
        raise ValueError(f"sample_on_device: logits ({logits.device}), params ({params.floats.device}) and "
                         f"uniforms ({uniforms.device}) must be on one device")
    p = params
    scores = logits.to(torch.float32, copy=True)

    if p.penalties:
        scores = ds.repetition_penalties(scores, p.history, p.f("token_repetition_penalty"),
                                         p.i("token_repetition_range"), p.i("token_repetition_decay"),
                                         p.f("token_frequency_penalty"), p.f("token_presence_penalty"))
    if p.blocked is not None:
        scores = scores.masked_fill(p.blocked, _BLOCKED_LOGIT)
    if p.token_bias is not None:
        scores = scores + p.token_bias
    if p.dry_breakers is not None:
        scores = ds.dry_penalties(scores, p.history, p.dry_breakers, p.vocab_size, p.i("dry_allowed_length"),
                                  p.f("dry_base"), p.f("dry_multiplier"), p.i("dry_max_ngram"), p.i("dry_range"),
                                  p.dry_ngram_bound)
    if p.vocab_size < vocab:
        scores[:, p.vocab_size:].fill_(float("-inf"))
    ok = ~(torch.isneginf(scores).all(dim=-1) | torch.isnan(scores).any(dim=-1))

    if p.all_greedy:
        tokens = scores.argmax(dim=-1)
        return _with_mirostat(p, DeviceSample(tokens, torch.ones(b, dtype=torch.float32, device=scores.device),
                                              p.f("mu")[:, 0], ok))

    u = uniforms.to(torch.float32).unsqueeze(-1)
    probs, ids = _truncated_distribution(scores, p)
    if p.xtc:
        xtc_on = (p.f("xtc_probability") > 0) & (p.f("greedy") == 0)
        fire, u = ds.split_uniform(u, torch.where(xtc_on, p.f("xtc_probability"), torch.zeros_like(u)))
        probs = ds.exclude_top_choices(probs, ids, p.xtc_eligible, fire, p.f("xtc_threshold"), xtc_on)
    pos = ds.draw(probs, u, p.f("skew")).unsqueeze(-1)
    tokens = ids.gather(-1, pos)[:, 0]
    token_probs = probs.gather(-1, pos)[:, 0].to(torch.float32)
    if p.any_greedy:
        greedy = p.f("greedy")[:, 0] > 0
        tokens = torch.where(greedy, scores.argmax(dim=-1), tokens)
        token_probs = torch.where(greedy, torch.ones_like(token_probs), token_probs)
    return _with_mirostat(p, DeviceSample(tokens, token_probs, p.f("mu")[:, 0], ok))


def _with_mirostat(p: DeviceSamplingParams, out: DeviceSample) -> DeviceSample:
    """Mirostat rows' mu moves by eta * (tau + log2 p(token)), greedy rows included (as on the host path)."""
    if p.mirostat:
        on = p.f("mirostat")[:, 0] > 0
        new_mu = out.mu + p.f("mirostat_eta")[:, 0] * (p.f("mirostat_tau")[:, 0] + torch.log2(out.probs))
        out.mu = torch.where(on, new_mu, out.mu)
    return out


def _truncated_distribution(scores: torch.Tensor, p: DeviceSamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler._truncated_distribution per row: sorted (probs, ids), (b, width)."""
    probs = ds.softmax_with_temperature(scores, p.f("first_temperature"), p.f("smoothing_factor"))
    pr, ids = ds.sorted_candidates(probs, p.i("top_k"), p.width)
    pr = ds.top_p(pr, p.f("top_p"))
    pr = ds.top_a(pr, p.f("top_a"))
    pr = ds.min_p(pr, p.f("min_p"))
    pr = ds.tail_free(pr, p.f("tfs"))
    pr, ids = ds.typical(pr, ids, p.f("typical"))
    if p.mirostat:
        pr = ds.mirostat_truncate(pr, p.f("mu"), p.f("mirostat") > 0)
    return ds.post_temperature(pr, p.f("post_temperature"), p.f("min_temp"), p.f("max_temp"),
                               p.f("temp_exponent")), ids


# ---------------------------------------------------------------- random draws on the device

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """
    Uniform draws in [0, 1), one per row, from a counter-based hash (SplitMix64's finaliser) of each row's
    (seed, counter), both int64 tensors of one shape on any device. Integer arithmetic only (wrapping int64), so
    the draws are bit-identical on every device, and a row's draw depends on its own seed and counter only.
    Returns fp32 multiples of 2**-24.
    """
    if seeds.dtype != torch.long or counters.dtype != torch.long:
        raise ValueError(f"counter_uniforms: seeds and counters must be int64, got {seeds.dtype} and {counters.dtype}")
    x = seeds * _GOLDEN + (counters + 1) * _MIX2
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    x = x ^ _shr(x, 31)
    return _shr(x, 40).to(torch.float32) * (2.0 ** -24)


# ---------------------------------------------------------------- per-settings masks, cached


def _bias_row(bias: torch.Tensor | None, vocab: int) -> torch.Tensor:
    row = torch.zeros(vocab, dtype=torch.float32)
    if bias is not None:
        bias = bias.detach().to("cpu", torch.float32).flatten()
        n = min(bias.shape[0], vocab)
        row[:n] = bias[:n]
    return row


def _breaker_mask(s: ExLlamaV2SamplerSettings, tokenizer, vocab: int, device: str) -> torch.Tensor:
    if s.dry_sequence_breakers is not None:
        return _mask_of(frozenset(s.dry_sequence_breakers), vocab, device)
    if tokenizer is not None:
        return _mask_of(default_dry_breakers(tokenizer), vocab, device)
    return _mask_of(frozenset(), vocab, device)


def _xtc_ignored_mask(s: ExLlamaV2SamplerSettings, tokenizer, vocab: int, device: str) -> torch.Tensor:
    if s.xtc_ignore_tokens is not None:
        return _mask_of(frozenset(s.xtc_ignore_tokens), vocab, device)
    if tokenizer is not None:
        return _mask_of(default_xtc_ignored(tokenizer), vocab, device)
    return _mask_of(frozenset(), vocab, device)


@lru_cache(maxsize=64)
def _mask_of(ids: frozenset, vocab: int, device: str) -> torch.Tensor:
    return token_mask(ids, vocab, device)


def _history_tensor(settings, histories, penalties: bool, dry: bool) -> torch.Tensor:
    """(b, n) long, each row's history window right-aligned and left-padded with -1; n is the longest window any
    row needs (the penalty range plus decay, the DRY range; -1 / 0: the whole history)."""
    windows = []
    for s, h in zip(settings, histories):
        if h is None or not len(h):
            windows.append([])
            continue
        h = h.tolist() if isinstance(h, torch.Tensor) else list(h)
        need = 0
        if penalties:
            need = len(h) if s.token_repetition_range == -1 else s.token_repetition_range + s.token_repetition_decay
        if dry and s.dry_multiplier > 0.0:
            need = max(need, len(h) if s.dry_range <= 0 else s.dry_range)
        windows.append(h[len(h) - min(need, len(h)):])
    n = max(len(w) for w in windows)
    return torch.tensor([[-1] * (n - len(w)) + w for w in windows], dtype=torch.long).view(len(windows), n)
