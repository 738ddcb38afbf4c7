"""Stable point names, the same on every architecture, resolved to hook sites on the model's modules.

Names (i = decoder layer index):
  embed                     embedding output (= blocks.0.resid_pre, hooked after the embedding module)
  blocks.{i}.resid_pre      residual stream entering layer i
  blocks.{i}.resid_mid      residual after the attention branch was added, before the MLP branch
  blocks.{i}.resid_post     residual leaving layer i
  blocks.{i}.attn_out       what the attention branch adds to the residual (after o_proj and any post-norm)
  blocks.{i}.mlp_out        what the MLP branch adds to the residual (after down_proj and any post-norm)
  blocks.{i}.attn.post_norm the normed input of attention;  blocks.{i}.mlp.post_norm the normed input of the MLP
  blocks.{i}.attn.attn_output  attention heads before o_proj (heads * head_dim wide)
  blocks.{i}.mlp.pre_down   the MLP activation before down_proj (intermediate_size wide)
  final_norm                output of the final norm (input of the head)
A TransformerLens-style `hook_` prefix on the last part is accepted (`blocks.3.hook_resid_post`).

Parallel blocks (GPT-J, GPT-NeoX): both branches read a norm of resid_pre. GPT-J shares one norm, so there
`attn.post_norm` and `mlp.post_norm` are the same tensor (editing one edits the input of both branches); GPT-NeoX
has one norm per branch (`mlp.post_norm` is the MLP's own norm). No tensor exists between the branches: `resid_mid` is defined as resid_pre + attn_out, the residual a sequential block would have there.
It is computed from the branch outputs; an edit of it changes the layer's output by (edited - original), since
the MLP branch never reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..module import Intervention

BLOCK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn.post_norm", "attn.attn_output",
                "mlp.post_norm", "mlp.pre_down")
GLOBAL_POINTS = ("embed", "final_norm")


class UnknownPointError(ValueError):
    pass


def raw(m):
    """The module under any Intervention wrappers."""
    while isinstance(m, Intervention):
        m = object.__getattribute__(m, "inner")
    return m


class Slot:
    """A place holding a module: `model.modules[index]` or an attribute of a (raw) module."""

    def __init__(self, owner, key):
        self.owner, self.key = owner, key

    def get(self):
        return self.owner[self.key] if isinstance(self.key, int) else getattr(self.owner, self.key)

    def set(self, m):
        if isinstance(self.key, int):
            self.owner[self.key] = m
        else:
            setattr(self.owner, self.key, m)

    def same(self, other: "Slot") -> bool:
        return self.owner is other.owner and self.key == other.key

    def __repr__(self):
        return f"Slot({type(self.owner).__name__}, {self.key!r})"


@dataclass
class Site:
    slot: Slot
    when: str  # "pre" (module input) or "post" (module output)


@dataclass
class Point:
    name: str
    sites: list  # one Site, or for a parallel resid_mid: [block pre, attn_out post, block post]
    width: int
    composite: bool = False


def normalize(name: str) -> str:
    if not isinstance(name, str):
        raise UnknownPointError(f"point name must be a string, got {name!r}")
    parts = name.strip().split(".")
    parts[-1] = parts[-1].removeprefix("hook_")
    return ".".join(parts)


def layer_blocks(model) -> list:
    """Per decoder layer: ("seq", list-index of attention, list-index of MLP) or ("par", list-index of block)."""
    out = []
    mods = model.modules
    i = 1
    while i < model.head_layer_idx - 1:
        m = raw(mods[i])
        if hasattr(m, "attn") and hasattr(m, "mlp") and hasattr(m, "layer_idx"):
            out.append(("par", i))
            i += 1
        elif getattr(m, "kv_layer", False) and hasattr(m, "o_proj"):
            out.append(("seq", i, i + 1))
            i += 2
        else:
            i += 1  # positional embedding
    return out


def point_names(model) -> list[str]:
    n = len(layer_blocks(model))
    return ["embed"] + [f"blocks.{i}.{p}" for i in range(n) for p in BLOCK_POINTS] + ["final_norm"]


def _linear_out(mod, linear_attr: str, post_norm_attr: str) -> Site:
    if getattr(mod, post_norm_attr, None) is not None:
        return Site(Slot(mod, post_norm_attr), "post")
    return Site(Slot(mod, linear_attr), "post")


def resolve(model, name: str) -> Point:
    name = normalize(name)
    cfg = model.config
    hidden = cfg.hidden_size
    mods = model.modules
    if name == "embed":
        return Point(name, [Site(Slot(mods, 1 if _has_pos_emb(model) else 0), "post")], hidden)
    if name == "final_norm":
        return Point(name, [Site(Slot(mods, model.head_layer_idx - 1), "post")], hidden)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    blocks = layer_blocks(model)
    if not m or m.group(2) not in BLOCK_POINTS:
        raise UnknownPointError(
            f"unknown point {name!r}: expected 'embed', 'final_norm' or 'blocks.<layer>.<point>' with point one of "
            f"{', '.join(BLOCK_POINTS)}")
    layer, what = int(m.group(1)), m.group(2)
    if layer >= len(blocks):
        raise UnknownPointError(f"point {name!r}: layer {layer} does not exist (the model has {len(blocks)} layers, 0..{len(blocks) - 1})")
    blk = blocks[layer]
    if blk[0] == "seq":
        return _resolve_seq(name, what, mods, blk[1], blk[2], hidden)
    return _resolve_par(name, what, mods, blk[1], hidden)


def _has_pos_emb(model) -> bool:
    return len(model.modules) > 1 and type(raw(model.modules[1])).__name__ == "ExLlamaV2PosEmbedding"


def _widths(attn, mlp, hidden):
    return {"attn.attn_output": attn.num_heads * attn.head_dim, "mlp.pre_down": mlp.interm_features}


def _resolve_seq(name, what, mods, ia, im, hidden) -> Point:
    attn, mlp = raw(mods[ia]), raw(mods[im])
    width = _widths(attn, mlp, hidden).get(what, hidden)
    site = {
        "resid_pre": lambda: Site(Slot(mods, ia), "pre"),
        "resid_mid": lambda: Site(Slot(mods, ia), "post"),
        "resid_post": lambda: Site(Slot(mods, im), "post"),
        "attn_out": lambda: _linear_out(attn, "o_proj", "post_layernorm"),
        "mlp_out": lambda: _linear_out(mlp, "down_proj", "post_layernorm"),
        "attn.post_norm": lambda: (Site(Slot(attn, "pre_layernorm"), "post") if attn.pre_layernorm is not None
                                   else Site(Slot(mods, ia), "pre")),
        "mlp.post_norm": lambda: (Site(Slot(mlp, "pre_layernorm"), "post") if mlp.pre_layernorm is not None
                                  else Site(Slot(mods, im), "pre")),
        "attn.attn_output": lambda: Site(Slot(attn, "o_proj"), "pre"),
        "mlp.pre_down": lambda: Site(Slot(mlp, "down_proj"), "pre"),
    }[what]()
    return Point(name, [site], width)


def _resolve_par(name, what, mods, ib, hidden) -> Point:
    blk = raw(mods[ib])
    attn, mlp = raw(blk.attn), raw(blk.mlp)
    width = _widths(attn, mlp, hidden).get(what, hidden)
    norm = getattr(blk, "input_layernorm", None)
    attn_out = _linear_out(attn, "o_proj", "post_layernorm")
    if what == "resid_mid":
        return Point(name, [Site(Slot(mods, ib), "pre"), attn_out, Site(Slot(mods, ib), "post")], width, composite=True)
    site = {
        "resid_pre": lambda: Site(Slot(mods, ib), "pre"),
        "resid_post": lambda: Site(Slot(mods, ib), "post"),
        "attn_out": lambda: attn_out,
        "mlp_out": lambda: _linear_out(mlp, "down_proj", "post_layernorm"),
        "attn.post_norm": lambda: Site(Slot(blk, "input_layernorm"), "post") if norm is not None else Site(Slot(mods, ib), "pre"),
        "mlp.post_norm": lambda: (Site(Slot(blk, "mlp_layernorm"), "post") if getattr(blk, "mlp_layernorm", None) is not None
                                  else Site(Slot(blk, "input_layernorm"), "post") if norm is not None
                                  else Site(Slot(mods, ib), "pre")),
        "attn.attn_output": lambda: Site(Slot(attn, "o_proj"), "pre"),
        "mlp.pre_down": lambda: Site(Slot(mlp, "down_proj"), "pre"),
    }[what]()
    return Point(name, [site], width)
