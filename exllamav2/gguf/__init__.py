"""GGUF files as a model source: HF config, HF-named tensors, conversion to an HF folder."""

from .errors import GGUFError
from .reader import GGUFFile

__all__ = ["GGUFError", "GGUFFile", "convert_gguf_to_hf"]


def convert_gguf_to_hf(*args, **kwargs):
    from .convert import convert_gguf_to_hf as convert
    return convert(*args, **kwargs)
