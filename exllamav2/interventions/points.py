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

Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE):
  mlp.post_norm  the normed input of the router, the experts and the shared expert.
  mlp.pre_down   (b, s, top_k * moe_intermediate_size): each token's selected experts' activations
                 act(w1 x) * w3 x, concatenated in routing-rank order (slot j = the expert with the j-th largest
                 router weight), exactly what the experts' down projections (w2) read; an edit changes their
                 input. Slot j's expert differs from token to token (routing is not fixed); the router weights
                 are applied after the down projection, so they are not in this tensor. The Qwen2-MoE shared
                 expert is a dense MLP of its own and is not part of it.
  mlp_out        what the branch adds to the residual: the router-weighted sum of the experts' outputs
                 [+ the gated shared expert] [-> post norm].

Parallel blocks (GPT-J, GPT-NeoX, Phi, Cohere, StableLM parallel residual): both branches read a norm of
resid_pre. `attn.post_norm` is the input of the attention branch and `mlp.post_norm` the input of the MLP branch:
the same values where one norm is shared (GPT-J, Phi, Cohere, StableLM), the MLP's own norm where it has one
(GPT-NeoX); editing either changes only its own branch's input. No tensor exists between the branches: `resid_mid`
is defined as resid_pre + attn_out, the residual a sequential block would have there. It is computed from the
branch outputs; an edit of it changes the layer's output by (edited - original), since the MLP branch never
reads it.

How points are found (no per-architecture attribute lists): a decoder module says where its points are with
`hook_sites()` -> {point suffix: (attribute path from the module, "pre" | "post", width)}, the path "" being the
module itself and a number in a path indexing a list (ExLlamaV2Attention, ExLlamaV2MLP and ExLlamaV2MoEMLP
declare it). A module that declares nothing
collects its child modules' sites (the parallel decoder: its `attn` and `mlp`), paths prefixed by the attribute.
Walking `model.modules`: a module with both `attn_out` and `mlp_out` is one layer; a module with `attn_out` opens
a layer that the next module with `mlp_out` closes; `embed` is the output of the module before the first layer.
Every point `point_names(model)` lists resolves to a module boundary (an `Intervention` around the module held in
that slot), so removing a hook restores the model exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..module import ExLlamaV2Module, Intervention

BLOCK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn.post_norm", "attn.attn_output",
                "mlp.post_norm", "mlp.pre_down")
GLOBAL_POINTS = ("embed", "final_norm")
RESID_POINTS = ("resid_pre", "resid_mid", "resid_post")


class UnknownPointError(ValueError):
    pass


def raw(m):
    """The module under any Intervention wrappers."""
    while isinstance(m, Intervention):
        m = object.__getattribute__(m, "inner")
    return m


class Slot:
    """A place holding a module: `model.modules[index]`, an element of a module's list, or an attribute of a
    (raw) module."""

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


# ---------------------------------------------------------------------------------------------- site discovery

def module_sites(module, _depth: int = 0) -> dict:
    """{point suffix: (path, when, width)} of one module of `model.modules` (or a child of one): declared by the
    module's `hook_sites()`, else collected from its child modules."""
    m = raw(module)
    declared = getattr(m, "hook_sites", None)
    if callable(declared):
        return dict(declared())
    out: dict = {}
    if _depth >= 4:
        return out
    for attr, child in vars(m).items():
        if attr == "model" or not isinstance(child, ExLlamaV2Module):
            continue
        for suffix, (path, when, width) in module_sites(child, _depth + 1).items():
            out.setdefault(suffix, (f"{attr}.{path}" if path else attr, when, width))
    return out


def _site(slot: Slot, path: str, when: str) -> Site:
    """The Site at `path` (attribute names and list indices, dot-separated) below the module in `slot`."""
    if not path:
        return Site(slot, when)
    owner = raw(slot.get())
    parts = path.split(".")
    for p in parts[:-1]:
        owner = owner[int(p)] if p.isdigit() else getattr(owner, p)
        owner = raw(owner)
    last = parts[-1]
    return Site(Slot(owner, int(last) if last.isdigit() else last), when)


@dataclass
class Layer:
    """One decoder layer: the list indices of its modules in `model.modules` and each point's site spec."""

    modules: tuple          # (attention, MLP) indices, or (block,) for one module with both branches
    sites: dict             # point suffix -> (model.modules index, path, when, width)

    @property
    def parallel(self) -> bool:
        return len(self.modules) == 1

    def as_tuple(self) -> tuple:
        return ("par", *self.modules) if self.parallel else ("seq", *self.modules)


def layers(model) -> list[Layer]:
    """The decoder layers, found by walking `model.modules` and each module's hook sites."""
    out, pending = [], None
    for i, mod in enumerate(model.modules):
        s = module_sites(mod)
        if "attn_out" in s and "mlp_out" in s:
            out.append(Layer((i,), {k: (i, *v) for k, v in s.items()}))
            pending = None
        elif "attn_out" in s:
            pending = (i, s)
        elif "mlp_out" in s and pending is not None:
            ia, sa = pending
            sites = {k: (ia, *v) for k, v in sa.items()}
            sites.update({k: (i, *v) for k, v in s.items()})
            out.append(Layer((ia, i), sites))
            pending = None
    return out


def layer_blocks(model) -> list:
    """Per decoder layer: ("seq", list-index of attention, list-index of MLP) or ("par", list-index of block)."""
    return [layer.as_tuple() for layer in layers(model)]


def _layer_suffixes(layer: Layer) -> list[str]:
    have = set(layer.sites)
    names = [p for p in BLOCK_POINTS if p in have or (p in RESID_POINTS and (p != "resid_mid" or "attn_out" in have))]
    return names + sorted(have - set(BLOCK_POINTS))


def point_names(model) -> list[str]:
    return (["embed"] + [f"blocks.{i}.{p}" for i, layer in enumerate(layers(model)) for p in _layer_suffixes(layer)]
            + ["final_norm"])


def resolve(model, name: str) -> Point:
    name = normalize(name)
    hidden = model.config.hidden_size
    mods = model.modules
    all_layers = layers(model)
    if name == "embed":  # the output of the last module before the first layer (token [+ position] embedding)
        return Point(name, [Site(Slot(mods, max(all_layers[0].modules[0] - 1, 0) if all_layers else 0), "post")],
                     hidden)
    if name == "final_norm":
        return Point(name, [Site(Slot(mods, model.head_layer_idx - 1), "post")], hidden)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        idx, what = int(m.group(1)), m.group(2)
        if idx < len(all_layers) and what in _layer_suffixes(all_layers[idx]):
            return _resolve_in_layer(name, what, mods, all_layers[idx], hidden)
        if idx >= len(all_layers) and what in BLOCK_POINTS:
            raise UnknownPointError(f"point {name!r}: layer {idx} does not exist (the model has {len(all_layers)} "
                                    f"layers, 0..{len(all_layers) - 1})")
        if idx < len(all_layers) and what in BLOCK_POINTS:
            raise UnknownPointError(f"point {name!r}: layer {idx} has no {what!r} (it has "
                                    f"{', '.join(_layer_suffixes(all_layers[idx]))})")
    raise UnknownPointError(
        f"unknown point {name!r}: expected 'embed', 'final_norm' or 'blocks.<layer>.<point>' with point one of "
        f"{', '.join(BLOCK_POINTS)}")


def _resolve_in_layer(name: str, what: str, mods, layer: Layer, hidden: int) -> Point:
    first, last = layer.modules[0], layer.modules[-1]
    if what == "resid_pre":
        return Point(name, [Site(Slot(mods, first), "pre")], hidden)
    if what == "resid_post":
        return Point(name, [Site(Slot(mods, last), "post")], hidden)
    if what == "resid_mid" and not layer.parallel:
        return Point(name, [Site(Slot(mods, first), "post")], hidden)
    if what == "resid_mid":
        i, path, when, _ = layer.sites["attn_out"]
        return Point(name, [Site(Slot(mods, first), "pre"), _site(Slot(mods, i), path, when),
                            Site(Slot(mods, first), "post")], hidden, composite=True)
    i, path, when, width = layer.sites[what]
    return Point(name, [_site(Slot(mods, i), path, when)], width)
