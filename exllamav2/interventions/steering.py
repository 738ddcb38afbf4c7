"""Steering vectors from contrastive prompts: per layer, the mean residual at the last prompt token over the
positive prompts minus the mean over the negative prompts. Saved as safetensors (one tensor per layer,
`layer.<i>`) with metadata: format, model, point, layers, prompt counts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .capture import add_capture
from .edits import AddVector
from .hooks import InterventionGroup, add_edit
from .points import BLOCK_POINTS, layer_blocks

FORMAT = "exllamav2.steering.v1"


def model_name(model) -> str:
    cfg = model.config
    path = getattr(cfg, "gguf_path", None) or getattr(cfg, "model_dir", None) or ""
    return os.path.basename(str(path).rstrip("/"))


@dataclass
class SteeringVectors:
    """Directions per decoder layer at one block point (e.g. "resid_post")."""

    vectors: dict  # layer index -> (d,) fp32 tensor
    point: str = "resid_post"
    model: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.point not in BLOCK_POINTS:
            raise ValueError(f"steering point: expected one of {BLOCK_POINTS}, got {self.point!r}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def point_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.point}"

    def edit(self, layer: int, scale: float = 1.0) -> AddVector:
        if layer not in self.vectors:
            raise KeyError(f"no steering vector for layer {layer}; layers held: {self.layers}")
        return AddVector(self.vectors[layer], scale)

    def register(self, model, layers=None, scale: float = 1.0, target=None, **target_kw) -> InterventionGroup:
        """Add `scale` x the vector at each of `layers` (default: all held); returns a removable group."""
        group = InterventionGroup()
        try:
            for layer in (self.layers if layers is None else layers):
                group.add(add_edit(model, self.point_name(layer), self.edit(layer, scale), target, **target_kw))
        except BaseException:
            group.remove()
            raise
        return group

    def save(self, path: str):
        from safetensors.torch import save_file
        meta = {"format": FORMAT, "model": self.model, "point": self.point,
                "layers": ",".join(map(str, self.layers)), "extra": json.dumps(self.metadata)}
        save_file({f"layer.{i}": v.detach().float().contiguous().cpu() for i, v in self.vectors.items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "SteeringVectors":
        from safetensors import safe_open
        if not os.path.exists(path):
            raise FileNotFoundError(f"steering file {path!r} does not exist")
        try:
            f = safe_open(path, "pt")
        except Exception as e:  # safetensors raises its own error type for a malformed header
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        with f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a steering file (metadata format={meta.get('format')!r}, expected {FORMAT!r})")
            vectors = {}
            for k in f.keys():
                if not k.startswith("layer.") or not k[6:].isdigit():
                    raise ValueError(f"{path}: unexpected tensor {k!r} (expected 'layer.<index>')")
                vectors[int(k[6:])] = f.get_tensor(k)
        return cls(vectors, meta.get("point", "resid_post"), meta.get("model", ""), json.loads(meta.get("extra", "{}")))


def last_token_activations(model, tokenizer, prompts: list[str], points: list[str], add_bos: bool = False) -> dict:
    """{point: (n_prompts, d) fp32} residuals at each prompt's last token (one forward per prompt, no cache)."""
    rows: dict = {p: [] for p in points}
    for text in prompts:
        ids = tokenizer.encode(text, add_bos=add_bos)
        n = ids.shape[-1]
        if n == 0:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        with add_capture(model, points, positions=[n - 1]) as cap:
            model.forward(ids, last_id_only=True)
        for p in points:
            rows[p].append(cap[p].values[-1].float())
    return {p: torch.stack(v) for p, v in rows.items()}


def contrastive_steering(model, tokenizer, positive: list[str], negative: list[str], layers=None,
                         point: str = "resid_post", add_bos: bool = False) -> SteeringVectors:
    """Mean(positive) - mean(negative) of the `point` activation at the last prompt token, per layer."""
    if not positive or not negative:
        raise ValueError("contrastive_steering: need at least one positive and one negative prompt")
    n_layers = len(layer_blocks(model))
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"contrastive_steering: layers {bad} out of range 0..{n_layers - 1}")
    names = [f"blocks.{i}.{point}" for i in layers]
    pos = last_token_activations(model, tokenizer, positive, names, add_bos)
    neg = last_token_activations(model, tokenizer, negative, names, add_bos)
    vectors = {i: pos[n].mean(0) - neg[n].mean(0) for i, n in zip(layers, names)}
    return SteeringVectors(vectors, point, model_name(model), {"n_positive": len(positive), "n_negative": len(negative)})
