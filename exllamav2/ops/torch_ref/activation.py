"""MLP activations by name, and the gated form act(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _quickgelu(x):
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "quickgelu": _quickgelu, "quick_gelu": _quickgelu,
}


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    return ACTIVATIONS[act](x)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    return ACTIVATIONS[act](gate) * up
