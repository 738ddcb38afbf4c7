"""MLP activation functions by name (HF names are accepted too)."""

from __future__ import annotations

from .ops.torch_ref.activation import ACTIVATIONS


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation '{name}' is not supported (supported: {', '.join(sorted(ACTIVATIONS))})") from None
