"""RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w, accumulated in fp32."""

from __future__ import annotations

import torch

from . import ops
from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError


class ExLlamaV2RMSNorm(ExLlamaV2Module):
    name = "RMSNorm"
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
        if isinstance(w, tuple):
            w = w[0]
        if tuple(w.shape) != (self.size,):
            raise TensorShapeError(f"{self.key}.weight: shape {list(w.shape)}, expected [{self.size}]")
        self.weight = _with_constant_bias(w, self.archparams.norm_constant_bias)

    def unload(self):
        self.weight = None

    def numel(self) -> int:
        return self.size

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, **kwargs):
        y = rms_norm(hidden_states, self.weight, self.variance_epsilon,
                     torch.float32 if self.output_fp32 else hidden_states.dtype)
        return {"hidden_states": y} if intermediates else y


def _with_constant_bias(w: torch.Tensor, c: float) -> torch.Tensor:
    if not c:
        return w
    # Gemma stores w and applies (1 + w) in fp32: keep the folded weight in fp32 (rounding 1 + w to bf16 would
    # lose precision HF keeps); rms_norm then scales in fp32 and casts once, as HF's Gemma norm does
    return torch.nn.Parameter(w.float() + c, requires_grad=False)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return ops.rms_norm(x, w, eps, out_dtype)
