"""LayerNorm with optional bias."""

from __future__ import annotations

import torch

from . import ops

from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError


class ExLlamaV2LayerNorm(ExLlamaV2Module):
    name = "LayerNorm"
    per_position = True

    def __init__(self, model, key, archparams=None, size: int | None = None, output_fp32: bool = False):
        super().__init__(model, key, archparams)
        self.size = size or self.config.hidden_size
        self.output_fp32 = output_fp32
        self.weight = None
        self.bias = None
        self.variance_epsilon = self.config.norm_eps
        self.assumed_footprint = self.size * 2

    def load(self, device_context: bool = True):
        w = self.load_weight()
        if w is None:
            raise MissingTensorError(f"{self.key}.weight: tensor not found in the model files")
        w, b = w if isinstance(w, tuple) else (w, None)
        for name, t in (("weight", w), ("bias", b)):
            if t is not None and tuple(t.shape) != (self.size,):
                raise TensorShapeError(f"{self.key}.{name}: shape {list(t.shape)}, expected [{self.size}]")
        self.weight, self.bias = w, b

    def unload(self):
        self.weight = self.bias = None

    def numel(self) -> int:
        return self.size * (2 if self.bias is not None else 1)

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, **kwargs):
        y = ops.layer_norm(hidden_states, self.weight, self.bias, self.variance_epsilon,
                           torch.float32 if self.output_fp32 else self.weight.dtype)
        return {"hidden_states": y} if intermediates else y
