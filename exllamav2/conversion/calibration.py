"""Calibration tokens: a text (the shipped default or a user file) tokenized into rows x length ids."""

from __future__ import annotations

import os
from importlib import resources

import torch

DEFAULT_NAME = "(default)"
DEFAULT_FILE = "calibration_default.txt"


def read_calibration_text(path: str | os.PathLike | None) -> tuple[str, str]:
    """(text, dataset name for quantization_config): the shipped text when path is None."""
    if path is None:
        return resources.files(__package__).joinpath(DEFAULT_FILE).read_text(encoding="utf-8"), DEFAULT_NAME
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: calibration file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: calibration file is empty")
    return text, os.path.basename(path)


def calibration_ids(tokenizer, text: str, rows: int, length: int) -> torch.Tensor:
    """(rows, length) int64 windows of the token stream. When the text holds more than rows * length tokens the
    windows are spread evenly over all of it (the shipped text mixes many genres in sections; windows taken only
    from its start would calibrate on a few of them). A shorter text wraps around: row r is the stream from
    r * length on, so rows then repeat text at different offsets where the lengths allow."""
    if rows < 1 or length < 2:
        raise ValueError(f"calibration needs rows >= 1 and length >= 2, got rows={rows}, length={length}")
    ids = tokenizer.encode(text, add_bos=False).reshape(-1).to(torch.int64)
    if ids.numel() < 2:
        raise ValueError("calibration text tokenizes to fewer than 2 tokens")
    if ids.numel() > rows * length:
        span = ids.numel() - length
        starts = [(r * span) // max(rows - 1, 1) for r in range(rows)]
        return torch.stack([ids[a:a + length] for a in starts])
    index = torch.arange(rows * length) % ids.numel()
    return ids[index].view(rows, length)
