"""ExLlamaV2Sampler.Settings: every knob of the sampler, with the original's field names and defaults."""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from exllamav2.generator.sampler_hooks import ExLlamaV2PostSamplingResult


def _bias_length(tokenizer) -> int:
    """Bias tensors cover the vocabulary padded to a multiple of 32, as in the original."""
    vocab_size = tokenizer.get_vocab_size()
    return vocab_size + (-vocab_size % 32)


@dataclass
class ExLlamaV2SamplerSettings:

    # Penalties on tokens already in the context
    token_repetition_penalty: float = 1.025
    token_repetition_range: int = -1  # -1: the whole context
    token_repetition_decay: int = 0  # tokens beyond the range over which penalties fade out linearly
    token_frequency_penalty: float = 0.0
    token_presence_penalty: float = 0.0

    # Temperature
    temperature: float = 0.8  # below 0.01: greedy
    smoothing_factor: float = 0.0  # > 0: quadratic sampling
    min_temp: float = 0
    max_temp: float = 0.0  # dynamic temperature when max_temp > min_temp
    temp_exponent: float = 1.0

    # Truncation
    top_k: int = 50
    top_p: float = 0.8
    top_a: float = 0.0
    min_p: float = 0
    tfs: float = 0
    typical: float = 0
    skew: float = 0

    temperature_last: bool = False

    mirostat: bool = False
    mirostat_tau: float = 1.5
    mirostat_eta: float = 0.1
    mirostat_mu: list[float] | None = None  # per batch row; set on the first mirostat sample

    token_bias: torch.Tensor | None = None  # (vocab padded to 32,) added to the logits
    cfg_scale: float | None = None  # needs logits of batch 2: (positive, negative)

    post_sampling_hooks: list[Callable[[ExLlamaV2PostSamplingResult], None]] = field(default_factory=list)

    # DRY ("don't repeat yourself")
    dry_allowed_length: int = 2
    dry_base: float = 1.75
    dry_multiplier: float = 0.0  # 0 disables
    dry_sequence_breakers: set[int] | None = None  # None: ids whose piece holds .,!?<>[](){}\n\t" plus special tokens
    dry_range: int = 0  # 0: the whole context
    dry_max_ngram: int = 20

    # XTC ("exclude top choices")
    xtc_probability: float = 0.0  # 0 disables
    xtc_threshold: float = 0.1
    xtc_ignore_tokens: frozenset[int] | None = None  # None: ids whose piece holds a newline plus special tokens

    @property
    def needs_host(self) -> bool:
        """Whether a sample with these settings must take the host path (ExLlamaV2Sampler.sample): CFG mixes two
        rows of logits into one. Everything else samples on the device too (generator/sampler_device.py)."""
        return self.cfg_scale is not None

    def validate(self, vocab_size: int | None = None, name: str = "gen_settings") -> None:
        """Raise ValueError, naming the field, for a setting no sampler stage can honour (a probability outside
        [0, 1], a negative or NaN temperature, a non-positive repetition penalty, a token bias that does not cover
        the vocabulary). Values that switch a stage off (top_p=0 or 1, top_k=0, ...) are fine."""
        import math

        def bad(field_name, value, want):
            raise ValueError(f"{name}.{field_name}={value!r}: must be {want}")

        def number(field_name):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                bad(field_name, v, "a number")
            return v

        for f in ("top_p", "min_p", "typical", "tfs", "top_a", "xtc_probability", "xtc_threshold"):
            if not 0.0 <= number(f) <= 1.0:
                bad(f, getattr(self, f), "in [0, 1]")
        for f in ("temperature", "min_temp", "max_temp", "smoothing_factor", "dry_multiplier"):
            if not 0.0 <= number(f) < math.inf:
                bad(f, getattr(self, f), "finite and >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an int >= 0 (0: off)")
        if not 0.0 < number("token_repetition_penalty") < math.inf:
            bad("token_repetition_penalty", self.token_repetition_penalty, "finite and > 0 (1: off)")
        for f in ("token_frequency_penalty", "token_presence_penalty", "temp_exponent", "skew",
                  "mirostat_tau", "mirostat_eta", "dry_base"):
            if not math.isfinite(number(f)):
                bad(f, getattr(self, f), "finite")
        if self.token_bias is not None:
            b = self.token_bias
            if not isinstance(b, torch.Tensor) or b.dim() != 1 or not b.is_floating_point():
                bad("token_bias", type(b).__name__ if not isinstance(b, torch.Tensor) else tuple(b.shape),
                    "a 1-d float tensor over the vocabulary")
            if vocab_size is not None and b.shape[0] < vocab_size:
                bad("token_bias", f"<{b.shape[0]} entries>", f"a tensor of at least the vocabulary's {vocab_size} "
                    f"entries")
            if bool(torch.isnan(b).any()) or bool(torch.isposinf(b).any()):
                bad("token_bias", "<tensor with NaN or +inf>", "free of NaN and +inf")

    @staticmethod
    def greedy(**kwargs) -> ExLlamaV2SamplerSettings:
        defaults = {
            "temperature": 1.0,
            "token_repetition_penalty": 1.0,
            "top_p": 0.0,
            "top_k": 1,
        }
        defaults.update(kwargs)
        return ExLlamaV2SamplerSettings(**defaults)

    def clone(self) -> ExLlamaV2SamplerSettings:
        c = copy(self)
        # Per-run state and the hook list must not be shared between clones
        c.post_sampling_hooks = list(self.post_sampling_hooks)
        c.mirostat_mu = None if self.mirostat_mu is None else list(self.mirostat_mu)
        return c

    def greedy_clone(self) -> ExLlamaV2SamplerSettings:
        """Greedy settings that keep this object's penalties, DRY and XTC settings (but not its token bias)."""
        c = ExLlamaV2SamplerSettings()
        c.top_k = 1
        c.top_p = 0
        for name in (
            "token_repetition_penalty", "token_repetition_range", "token_repetition_decay",
            "token_frequency_penalty", "token_presence_penalty",
            "dry_allowed_length", "dry_base", "dry_multiplier", "dry_sequence_breakers", "dry_range",
            "dry_max_ngram", "xtc_probability", "xtc_threshold", "xtc_ignore_tokens",
        ):
            setattr(c, name, getattr(self, name))
        c.token_bias = None
        return c

    def disallow_tokens(self, tokenizer, tokens: list[int]):
        """Set (or update) the token bias so that the given ids are never sampled."""
        if self.token_bias is None:
            self.token_bias = torch.zeros((_bias_length(tokenizer),), dtype=torch.float)
        self.token_bias[list(tokens)] = float("-inf")

    def allow_tokens(self, tokenizer, tokens: list[int | str]):
        """Set (or update) the token bias so that only the given ids (or single-token pieces) can be sampled."""
        if self.token_bias is None:
            self.token_bias = torch.full((_bias_length(tokenizer),), float("-inf"), dtype=torch.float)
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, str)):
                raise ValueError(f"allow_tokens: expected token ids (int) or pieces (str), got {t!r}")
            self.token_bias[t if isinstance(t, int) else _piece_to_id(tokenizer, t)] = 0.0


def _piece_to_id(tokenizer, piece: str) -> int:
    token_id = tokenizer.single_id(piece) if hasattr(tokenizer, "single_id") else None
    if token_id is None:
        pieces = tokenizer.get_id_to_piece_list(True)
        token_id = pieces.index(piece) if piece in pieces else None
    if token_id is None:
        raise ValueError(f"allow_tokens: {piece!r} is not a single token piece of the tokenizer")
    return token_id
