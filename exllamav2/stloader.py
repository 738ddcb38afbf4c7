"""Tensor sources: safetensors files read through the `safetensors` library.

Every source (a safetensors file here, a GGUF file in `exllamav2.gguf`) offers the same small interface:
`keys()`, `shape(key)`, `dtype(key)`, `nbytes(key)` (bytes as stored, from the header only) and
`get_tensor(key, device, dtype)`. `ExLlamaV2Config.tensor_file_map` maps each tensor name to its source.
"""

from __future__ import annotations

import os
import struct

import torch
from safetensors import safe_open

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorFileError(ValueError):
    pass


def apply_keymap(name: str, keymap) -> str:
    for find, replace in keymap or ():
        if find.startswith("$"):
            if name.startswith(find[1:]):
                name = replace + name[len(find) - 1:]
        else:
            name = name.replace(find, replace)
    return name


def _check_header(path: str) -> None:
    """Validate the header and file length before handing the file to safetensors, so a truncated or
    corrupt file is reported with its path and what is wrong instead of a bare library error."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8:
            raise TensorFileError(
                f"{path}: corrupt or truncated safetensors file (header claims {hlen} bytes, file has {size})"
            )


class SafetensorsFile:
    def __init__(self, path: str, keymap=None):
        self.path = path
        _check_header(path)
        try:
            self._handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers / lengths
            raise TensorFileError(f"{path}: cannot read safetensors file: {e}") from None
        self._names = {}  # our name -> name in the file
        self._meta = {}
        size = os.path.getsize(path)
        for fname in self._handle.keys():
            sl = self._handle.get_slice(fname)
            shape = tuple(sl.get_shape())
            dt = _ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                raise TensorFileError(f"{path}: tensor '{fname}' has unsupported dtype {sl.get_dtype()}")
            name = apply_keymap(fname, keymap)
            self._names[name] = fname
            numel = 1
            for s in shape:
                numel *= s
            self._meta[name] = (shape, dt, numel * dt.itemsize)
        self._data_len = size

    def keys(self):
        return self._names.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def shape(self, key: str) -> tuple:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def nbytes(self, key: str) -> int:
        return self._meta[key][2]

    def get_tensor(self, key: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            t = self._handle.get_tensor(self._names[key])
        except KeyError:
            raise KeyError(f"{self.path}: no tensor '{key}'") from None
        except Exception as e:
            raise TensorFileError(f"{self.path}: cannot read tensor '{key}': {e}") from None
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if str(device) != "cpu" else t

    def get_slice(self, key: str, dim: int, beg: int, end: int, device="cpu", dtype=None) -> torch.Tensor:
        """[beg, end) along dim 0 or 1 of a tensor, read without loading the rest (fused-tensor slicing)."""
        sl = self._handle.get_slice(self._names[key])
        t = sl[beg:end] if dim == 0 else sl[:, beg:end]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if str(device) != "cpu" else t

    def __repr__(self):
        return f"SafetensorsFile({self.path!r}, {len(self._names)} tensors)"
