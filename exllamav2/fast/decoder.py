"""FastDecoder: a batch-uniform decode step and a dense prefill for Llama-shaped models, kept beside the
reference modules (which stay untouched) and tested equal to them.

Decode: fused q/k/v and gate/up weights (bf16, int8 or int4 g32), one RoPE expression for q and k, per-layer KV
buffers written with index_copy_ (inductor turns a slice-assign into a copy of the whole buffer), 4-D SDPA with
the GQA group folded into the query length (no mask, flash CPU kernel). Optionally compiled as one graph.
Prefill: dense bf16 GEMMs on the reference weights, causal 4-D SDPA, the head on the last position only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .build import FastLayer, fused_linear, resolve_kind
from .linears import BF16, DenseLinear
from .support import unsupported_reason

PREFILL_CHUNK = 2048


class FastPathUnsupported(ValueError):
    pass


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # same rounding as the reference RMSNorm: fp32 normalisation, back to bf16, scale in bf16
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(BF16) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FastDecoder(nn.Module):
    """Build once per (model, cache). `weights`: "auto" (the GGUF's own 4/8-bit blocks when it has them, else bf16),
    "bf16", "int8" or "int4". `cache`: an ExLlamaV2Cache in bf16 whose tensors become the KV buffers (so the
    reference path and this one can take turns on it); without one the decoder owns buffers of
    (batch_size, max_seq_len). `compile=True` compiles the decode step (see compile.py)."""

    def __init__(self, model, cache=None, max_seq_len: int | None = None, batch_size: int = 1,
                 weights: str = "auto", compile: bool = False, progress: bool = True):
        super().__init__()
        why = unsupported_reason(model)
        if why:
            raise FastPathUnsupported(f"exllamav2.fast cannot run this model: {why}")
        cfg = model.config
        self.model, self.cache = model, cache
        self.kind = resolve_kind(model, weights)
        self.eps = cfg.norm_eps
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale()
        if cache is not None:
            if cache.dtype != BF16 or type(cache).__name__ != "ExLlamaV2Cache":
                raise FastPathUnsupported(f"exllamav2.fast needs a plain bf16 ExLlamaV2Cache, got "
                                          f"{type(cache).__name__} in {cache.dtype}")
            self.batch_size, self.max_seq_len = cache.batch_size, cache.max_seq_len
            k_bufs, v_bufs = cache.key_states, cache.value_states
        else:
            self.batch_size, self.max_seq_len = batch_size, max_seq_len or cfg.max_seq_len
            shape = (self.batch_size, self.n_kv, self.max_seq_len, self.head_dim)
            k_bufs = [torch.zeros(shape, dtype=BF16) for _ in range(cfg.num_hidden_layers)]
            v_bufs = [torch.zeros(shape, dtype=BF16) for _ in range(cfg.num_hidden_layers)]
        self.seq_len = cache.current_seq_len if cache is not None else 0

        mods = model.modules
        self.embedding = mods[0].embedding.data.to(BF16)
        self.layers = nn.ModuleList(FastLayer(model, mods[1 + 2 * i], mods[2 + 2 * i], self.kind)
                                    for i in range(cfg.num_hidden_layers))
        for i, layer in enumerate(self.layers):
            layer.register_buffer("k", k_bufs[i], persistent=False)
            layer.register_buffer("v", v_bufs[i], persistent=False)
        self.norm = nn.Parameter(mods[-2].weight.data.to(BF16), requires_grad=False)
        self.head = fused_linear(model, [mods[-1]], self.kind)
        cos, sin = model.rotary_for_layer(0).tables(self.max_seq_len, "cpu", BF16)
        self.register_buffer("cos", cos[:self.max_seq_len].contiguous(), persistent=False)
        self.register_buffer("sin", sin[:self.max_seq_len].contiguous(), persistent=False)

        self.compiled = False
        self._step = self.step
        if compile:
            from .compile import compile_step
            self._step = compile_step(self, progress=progress)
            self.compiled = True
        else:
            for lin in self.all_linears():
                if isinstance(lin, DenseLinear):
                    lin.prepack()

    def all_linears(self):
        for layer in self.layers:
            yield from layer.linears()
        yield self.head

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (the embedding row is negligible)."""
        return sum(lin.nbytes() for lin in self.all_linears())

    # ------------------------------------------------------------------ decode

    def step(self, ids: torch.Tensor, pos: torch.Tensor, end: int) -> torch.Tensor:
        """One token per row at position `pos` (1,) long == end - 1: ids (b, 1) -> fp32 logits (b, vocab)."""
        b = ids.shape[0]
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids.view(b), self.embedding)                      # (b, hidden)
        cos, sin = self.cos[pos], self.sin[pos]                            # (1, d)
        for layer in self.layers:
            qkv = layer.qkv(_rms(x, layer.ln1, self.eps))
            qk = _rope(qkv[:, :(H + Hkv) * d].view(b, H + Hkv, d), cos, sin)
            q = qk[:, :H].reshape(b, Hkv, H // Hkv, d)
            k = qk[:, H:].view(b, Hkv, 1, d)
            v = qkv[:, (H + Hkv) * d:].view(b, Hkv, 1, d)
            kb, vb = (layer.k, layer.v) if b == self.batch_size else (layer.k[:b], layer.v[:b])
            kb.index_copy_(2, pos, k)
            vb.index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, kb[:, :, :end], vb[:, :, :end], scale=self.scale)
            x = x + layer.o(a.reshape(b, H * d))
            gu = layer.gate_up(_rms(x, layer.ln2, self.eps))
            g, u = gu.chunk(2, dim=-1)
            x = x + layer.down(F.silu(g) * u)
        return self.head(_rms(x, self.norm, self.eps)).float()

    # ------------------------------------------------------------------ prefill

    def prefill(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Prompt tokens ids (b, s) at positions start.. -> fp32 logits of the last position (b, vocab)."""
        b, s = ids.shape
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embedding)
        cos, sin = self.cos[start:start + s, None], self.sin[start:start + s, None]   # (s, 1, d)
        end = start + s
        mask = None
        if start > 0:
            mask = torch.ones(s, end, dtype=torch.bool).tril(start)
        for layer in self.layers:
            w, wb = layer.prefill_w, layer.prefill_b
            h = _rms(x, layer.ln1, self.eps)
            q = F.linear(h, w["q_proj"], wb["q_proj"]).view(b, s, H, d)
            k = F.linear(h, w["k_proj"], wb["k_proj"]).view(b, s, Hkv, d)
            v = F.linear(h, w["v_proj"], wb["v_proj"]).view(b, s, Hkv, d)
            q, k = _rope(q, cos, sin).transpose(1, 2), _rope(k, cos, sin).transpose(1, 2)
            layer.k[:b, :, start:end].copy_(k)
            layer.v[:b, :, start:end].copy_(v.transpose(1, 2))
            kk = layer.k[:b, :, :end].repeat_interleave(H // Hkv, dim=1)
            vv = layer.v[:b, :, :end].repeat_interleave(H // Hkv, dim=1)
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None, scale=self.scale)
            x = x + F.linear(a.transpose(1, 2).reshape(b, s, H * d), w["o_proj"])
            h = _rms(x, layer.ln2, self.eps)
            x = x + F.linear(F.silu(F.linear(h, w["gate_proj"])) * F.linear(h, w["up_proj"]), w["down_proj"])
        return self.head(_rms(x[:, -1], self.norm, self.eps)).float()

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache=None, last_id_only: bool = True) -> torch.Tensor:
        """Like model.forward(ids, cache, last_id_only=True) for rows that share one length: fp32 logits
        (b, 1, vocab); the cache (or the decoder's own buffers) advances by ids.shape[1]."""
        if cache is not self.cache:
            raise ValueError("this FastDecoder was built for another cache; build one per cache")
        if not last_id_only:
            raise ValueError("the fast path computes the last position's logits only (last_id_only=True)")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        b, s = ids.shape
        if b > self.batch_size:
            raise ValueError(f"batch of {b} rows does not fit a fast decoder built for batch_size={self.batch_size}")
        start = cache.current_seq_len if cache is not None else self.seq_len
        if start + s > self.max_seq_len:
            raise ValueError(f"input of {s} tokens after {start} cached ones needs {start + s} positions, "
                             f"but the cache holds max_seq_len={self.max_seq_len}")
        if s == 1:
            # a copy made here is an inference tensor like the compile's warm-up input: a caller's plain tensor
            # would fail dynamo's dispatch-key guard and recompile the step
            logits = self._step(ids.clone(), torch.tensor([start]), start + 1)
        else:
            for beg in range(0, s, PREFILL_CHUNK):
                logits = self.prefill(ids[:, beg:beg + PREFILL_CHUNK], start + beg)
        self._advance(start + s)
        return logits.unsqueeze(1)

    def reset(self) -> None:
        self._advance(0)

    def _advance(self, n: int) -> None:
        self.seq_len = n
        if self.cache is not None:
            self.cache.current_seq_len = n

    @property
    def current_seq_len(self) -> int:
        return self.cache.current_seq_len if self.cache is not None else self.seq_len
