"""MLP activation functions by name (HF names are accepted too)."""

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


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation '{name}' is not supported (supported: {', '.join(sorted(ACTIVATIONS))})") from None
