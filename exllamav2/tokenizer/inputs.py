"""Checks on what callers pass to encode/decode/stream: token ids as plain int lists, texts as valid Unicode.
A wrong type or a lone surrogate is a TypeError/ValueError naming the call, not an error from inside `tokenizers`
or a float id quietly truncated to another token."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch


def _integer_dtype(a: torch.Tensor | np.ndarray) -> bool:
    """Whether `a` can hold ids. An empty one can, whatever its dtype (torch.tensor([]) is float32)."""
    empty = a.size == 0 if isinstance(a, np.ndarray) else a.numel() == 0
    if empty:
        return True
    if isinstance(a, torch.Tensor):
        return not (a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool)
    return a.dtype.kind in "iu"


def _id_list(seq: Any, where: str) -> list[int]:
    """A flat sequence of ids as a list of ints (bool and float ids are refused)."""
    if isinstance(seq, (torch.Tensor, np.ndarray)):
        if not _integer_dtype(seq):
            raise TypeError(f"{where}: token ids must be integers, got a {type(seq).__name__} of dtype {seq.dtype}")
        return seq.reshape(-1).tolist()
    if isinstance(seq, (str, bytes)):
        raise TypeError(f"{where}: expected token ids (a tensor or a list of ints), got {type(seq).__name__}; "
                        "use encode() for text")
    out = []
    for pos, i in enumerate(seq):
        if isinstance(i, (bool, np.bool_)):
            raise TypeError(f"{where}: token ids must be integers, got bool {i!r} at position {pos}")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"{where}: token ids must be integers, got {type(i).__name__} {i!r} at position {pos}") from None
    return out


def id_list(ids: Any, where: str) -> list[int]:
    """One sequence of ids: an int, a tensor/array (flattened) or an iterable of ints."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, (bool, np.bool_)):
        return [int(ids)]
    if not hasattr(ids, "__iter__"):
        raise TypeError(f"{where}: expected token ids (an int, a tensor or a list of ints), got {type(ids).__name__}")
    return _id_list(ids, where)


def id_rows(ids: Any, where: str) -> tuple[list[list[int]], bool]:
    """Ids given as one sequence or as a batch: (rows, batched). A tensor/array is a batch when 2-D; a list is one
    when its items are sequences."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim > 2:
            raise ValueError(f"{where}: expected a 1-D or 2-D tensor of ids, got shape {tuple(ids.shape)}")
        if ids.ndim == 2:
            if not _integer_dtype(ids):
                raise TypeError(f"{where}: token ids must be integers, got a {type(ids).__name__} of dtype {ids.dtype}")
            return ids.tolist(), True
        return [_id_list(ids, where)], False
    if isinstance(ids, (int, np.integer, str, bytes)) or not hasattr(ids, "__iter__"):
        return [id_list(ids, where)], False
    items = list(ids)
    nested = [isinstance(i, (list, tuple)) or isinstance(i, (torch.Tensor, np.ndarray)) and i.ndim > 0 for i in items]
    if not any(nested):
        return [_id_list(items, where)], False
    if not all(nested):
        raise TypeError(f"{where}: expected a list of ids or a list of rows of ids, got a mix of both")
    return [_id_list(row, f"{where} (row {r})") for r, row in enumerate(items)], True


def check_texts(text: Any, where: str) -> tuple[list[str], bool]:
    """(texts, single) for a str or an iterable of str; every text must be encodable as UTF-8."""
    single = isinstance(text, str)
    if single:
        texts = [text]
    elif isinstance(text, bytes) or not hasattr(text, "__iter__"):
        raise TypeError(f"{where}: expected a str or a list of str, got {type(text).__name__}")
    else:
        texts = list(text)
    for n, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where}: expected a str or a list of str, got {type(t).__name__} at position {n}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                which = "" if single else f" {n}"
                raise ValueError(f"{where}: text{which} holds a lone surrogate U+{ord(t[e.start]):04X} at index "
                                 f"{e.start}, which is not valid Unicode") from None
    return texts, single
