"""Rotary position embeddings: inverse frequencies for each scaling type, cached cos/sin tables, and
application in NeoX (rotate halves) or GPT-J (rotate interleaved pairs) style on the first rot_dim channels.

The frequency formulas follow HF transformers' `modeling_rope_utils` so that logits agree with it; the
cos/sin values are computed in fp32 as there (position * inv_freq), then cast to the activation dtype.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .architecture import RopeStyle


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def compute_inv_freq(rp: dict, dim: int, max_pos: int, seq_len: int | None = None,
                     alpha: float = 1.0) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor) for one rope_parameters dict. `alpha` is the NTK alpha
    override (scale_alpha_value): base *= alpha ** (dim / (dim - 2))."""
    rope_type = rp.get("rope_type", "default")
    base = float(rp["rope_theta"])
    if alpha != 1.0:
        base *= alpha ** (dim / (dim - 2))
    orig_max = rp.get("original_max_position_embeddings") or max_pos

    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0

    if rope_type == "linear":
        return _base_inv_freq(base, dim) / rp["factor"], 1.0

    if rope_type == "dynamic":
        factor = rp["factor"]
        sl = max_pos if seq_len is None else max(seq_len, max_pos)
        base = base * ((factor * sl / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0

    if rope_type == "llama3":
        inv = _base_inv_freq(base, dim)
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, scaled), 1.0

    if rope_type == "yarn":
        factor = rp.get("factor") or max_pos / orig_max
        att = rp.get("attention_factor")
        mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if att is None:
            att = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all)) if (mscale and mscale_all) else get_mscale(factor)
        beta_fast = rp.get("beta_fast") or 32
        beta_slow = rp.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig_max / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rp.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extra_factor = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra_factor) + (1.0 / pos_freqs) * extra_factor
        return inv, att

    if rope_type in ("longrope", "su"):
        factor = rp.get("factor") or max_pos / orig_max
        att = rp.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig_max))
        ext = rp["long_factor"] if (seq_len and seq_len > orig_max) else rp["short_factor"]
        ext = torch.tensor(ext, dtype=torch.float32)
        if ext.numel() != dim // 2:
            raise ValueError(f"rope_scaling: longrope factors have {ext.numel()} entries, expected {dim // 2}")
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * base ** shape), att

    raise ValueError(f"rope_scaling: rope type '{rope_type}' is not supported "
                     "(supported: default, linear, dynamic, llama3, yarn, longrope)")


class RotaryEmbedding:
    """cos/sin tables for one set of rope parameters, built lazily per device and dtype."""

    def __init__(self, rp: dict, head_dim: int, rot_dim: int, max_pos: int, style: RopeStyle,
                 scale_pos_emb: float = 1.0, alpha: float = 1.0, table_len: int | None = None):
        self.rp = rp
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.max_pos = max_pos
        self.style = style
        self.scale_pos_emb = scale_pos_emb
        self.alpha = alpha
        self.table_len = max(table_len or max_pos, 1)
        self.dynamic = rp.get("rope_type") in ("dynamic", "longrope", "su")
        self._tables: dict = {}

    def _build(self, seq_len: int | None, device, dtype):
        inv, att = compute_inv_freq(self.rp, self.rot_dim, self.max_pos, seq_len, self.alpha)
        n = max(self.table_len, seq_len or 0)
        t = torch.arange(n, dtype=torch.int64).float()
        if self.scale_pos_emb != 1.0:
            t = t / self.scale_pos_emb
        freqs = torch.outer(t, inv)
        if self.style == RopeStyle.GPTJ:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * att).to(device=device, dtype=dtype), (emb.sin() * att).to(device=device, dtype=dtype)

    def length_key(self, total_len: int) -> int:
        """Which frequencies a sequence `total_len` long is rotated with: 0 for the length-independent ones, else
        the length whose tables length-dependent RoPE (longrope, dynamic NTK) builds, as HF's updates pick them."""
        if not self.dynamic:
            return 0
        orig = self.rp.get("original_max_position_embeddings") or self.max_pos
        if self.rp.get("rope_type") == "dynamic":
            return max(total_len, self.max_pos)
        return orig + 1 if total_len > orig else 0

    def tables(self, total_len: int, device, dtype):
        """cos, sin of shape (n, rot_dim) with n >= total_len."""
        if self.dynamic:
            # frequencies depend on the longest position seen, as HF's dynamic/longrope updates do
            key_len = self.length_key(total_len)
            key = (key_len, str(device), dtype)
            if key not in self._tables:
                # keep a few lengths: the sequences of one packed paged step each pick their own (paged_attn.py)
                keep = list(dict.fromkeys(k[0] for k in self._tables))[-3:]
                self._tables = {k: v for k, v in self._tables.items() if k[0] in keep}
                self._tables[key] = self._build(key_len or None, device, dtype)
            cos, sin = self._tables[key]
        else:
            key = (0, str(device), dtype)
            if key not in self._tables or self._tables[key][0].shape[0] < total_len:
                self.table_len = max(self.table_len, total_len)
                self._tables[key] = self._build(None, device, dtype)
            cos, sin = self._tables[key]
        if cos.shape[0] < total_len:
            raise ValueError(f"position {total_len - 1} is beyond the rotary table ({cos.shape[0]} positions)")
        return cos, sin

    def gathered(self, positions: torch.Tensor, total: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at `positions` (b, s): (b, s, 1, rot_dim), for `rotate`."""
        cos, sin = self.tables(total, device, dtype)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (b, s, heads, head_dim) rotated by gathered tables (q and k heads may come in one tensor)."""
        return ops.rope(x, cos, sin, self.style == RopeStyle.GPTJ)
