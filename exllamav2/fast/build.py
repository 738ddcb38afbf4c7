"""Decode weights for the fast path, built once from a loaded ExLlamaV2: fused q/k/v and gate/up matrices in the
requested kind, taken from the GGUF quant blocks the model was loaded from where they map exactly."""

from __future__ import annotations

import torch
import torch.nn as nn

from .gguf_blocks import SUPPORTED_TYPES, BlockDigits, decode_blocks
from .linears import BF16, from_gguf_blocks, make_linear

KINDS = ("auto", "bf16", "int8", "int4")


def gguf_blocks(model, linears) -> BlockDigits | None:
    """The row-concatenated GGUF blocks of these linears when all come from Q4_0/Q4_1/Q8_0 of one kind."""
    parts = []
    for lin in linears:
        name = lin.key + ".weight"
        src = model.config.tensor_file_map.get(name)
        if src is None or not hasattr(src, "raw") or lin.f_key is not None:
            return None
        gtype = src.ggml_type(name)
        if gtype not in SUPPORTED_TYPES:
            return None
        gt, raw, shape = src.raw(name)
        parts.append(decode_blocks(gt, raw, shape, name))
    kinds = {p.kind for p in parts}
    if len(kinds) != 1 or len({p.offset is None for p in parts}) != 1:
        return None
    off = None if parts[0].offset is None else torch.cat([p.offset for p in parts])
    return BlockDigits(parts[0].kind, torch.cat([p.digits for p in parts]), torch.cat([p.scale for p in parts]), off)


def resolve_kind(model, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"weights='{kind}': expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    lin = model.modules[1].q_proj
    src = model.config.tensor_file_map.get(lin.key + ".weight")
    gtype = src.ggml_type(lin.key + ".weight") if src is not None and hasattr(src, "ggml_type") else None
    return {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}.get(gtype, "bf16")


def fused_linear(model, linears, kind: str) -> nn.Module:
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.data if b is not None else torch.zeros(lin.out_features) for b, lin in zip(biases, linears)]).to(BF16)
    if kind != "bf16":
        blocks = gguf_blocks(model, linears)
        if blocks is not None:
            return from_gguf_blocks(blocks, kind, bias)
    w = torch.cat([lin.get_weight().to(BF16) for lin in linears]) if len(linears) > 1 else linears[0].get_weight()
    return make_linear(w, kind, bias)


class FastLayer(nn.Module):
    """One decoder layer's decode weights, plus the reference model's dense weights for prefill."""

    def __init__(self, model, attn, mlp, kind: str):
        super().__init__()
        self.ln1 = nn.Parameter(attn.pre_layernorm.weight.data.to(BF16), requires_grad=False)
        self.ln2 = nn.Parameter(mlp.pre_layernorm.weight.data.to(BF16), requires_grad=False)
        self.qkv = fused_linear(model, [attn.q_proj, attn.k_proj, attn.v_proj], kind)
        self.o = fused_linear(model, [attn.o_proj], kind)
        self.gate_up = fused_linear(model, [mlp.gate_proj, mlp.up_proj], kind)
        self.down = fused_linear(model, [mlp.down_proj], kind)
        # prefill runs dense bf16 GEMMs on the reference weights (no copy when the model is bf16)
        self.prefill_w = {n: _bf16(getattr(m, n).get_weight()) for m, names in
                          ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj")))
                          for n in names}
        self.prefill_b = {n: (_bf16(getattr(attn, n).bias.data) if getattr(attn, n).bias is not None else None)
                          for n in ("q_proj", "k_proj", "v_proj")}

    def linears(self):
        return (self.qkv, self.o, self.gate_up, self.down)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == BF16 else t.to(BF16)
