"""A GGUF file's metadata key/values (the header only, no tensors) as plain Python values, for the tokenizer."""

from __future__ import annotations

import os
from typing import Any

from ..gguf.header import read_header


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as plain Python values (arrays become lists). A damaged file is a
    GGUFError (a ValueError) naming the file."""
    return read_header(path).metadata()
