"""Per-head norm on q or k, shape (b, s, heads, head_dim): RMSNorm or LayerNorm, weight (head_dim) shared by all
heads or (heads, head_dim) per head."""

from __future__ import annotations

import torch

from . import ops
from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError
from .rmsnorm import _with_constant_bias, rms_norm


class ExLlamaV2HeadNorm(ExLlamaV2Module):
    name = "HeadNorm"

    def __init__(self, model, key, num_heads: int, head_dim: int, archparams=None):
        super().__init__(model, key, archparams)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.is_rms = self.archparams.headnorm == "rmsnorm"
        self.weight = None
        self.bias = None
        self.variance_epsilon = self.config.norm_eps
        self.assumed_footprint = num_heads * head_dim * 2

    def load(self, device_context: bool = True):
        w = self.load_weight()
        if w is None:
            w = self._load_stacked_per_head()
        if w is None:
            raise MissingTensorError(f"{self.key}.weight: tensor not found in the model files")
        w, b = w if isinstance(w, tuple) else (w, None)
        ok = (tuple(w.shape) in ((self.head_dim,), (self.num_heads, self.head_dim)))
        if not ok:
            raise TensorShapeError(f"{self.key}.weight: shape {list(w.shape)}, expected [{self.head_dim}] or "
                                   f"[{self.num_heads}, {self.head_dim}]")
        self.weight = _with_constant_bias(w, self.archparams.norm_constant_bias)
        self.bias = b

    def _load_stacked_per_head(self):
        """Per-head norms stored as one module per head (`<key>.norms.<h>.weight`, StableLM): stacked to
        (heads, head_dim)."""
        names = [f"{self.key}.norms.{h}" for h in range(self.num_heads)]
        if not all(self.has_tensor(n + ".weight") for n in names):
            return None
        parts = [self.load_weight(override_key=n) for n in names]
        ws = [p[0] if isinstance(p, tuple) else p for p in parts]
        bs = [p[1] for p in parts if isinstance(p, tuple)]
        w = torch.nn.Parameter(torch.stack([t.data for t in ws]), requires_grad=False)
        if bs:
            if len(bs) != len(parts):
                raise MissingTensorError(f"{self.key}.norms.*.bias: present for some heads only")
            return w, torch.nn.Parameter(torch.stack([t.data for t in bs]), requires_grad=False)
        return w

    def unload(self):
        self.weight = self.bias = None

    def numel(self) -> int:
        return self.weight.numel() if self.weight is not None else self.head_dim

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, **kwargs):
        x = hidden_states
        if self.is_rms:
            y = rms_norm(x, self.weight, self.variance_epsilon, x.dtype)
        else:
            # LayerNorm over head_dim in fp32 (Cohere's per-head norm does its statistics in fp32)
            y = ops.layer_norm(x, self.weight, self.bias, self.variance_epsilon, x.dtype, fp32_stats=True)
        return {"hidden_states": y} if intermediates else y
