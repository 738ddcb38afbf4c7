"""Read the key/value metadata block of a GGUF file (the header only, no tensors).

`gguf.GGUFReader` builds a numpy view per array element while it parses a file, which takes
~15 s for a 262k-token vocabulary; the tokenizer needs only the metadata, so this reads that
block directly with the value-type codes from the `gguf` package.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import numpy as np
from gguf import GGUFValueType

_GGUF_MAGIC = b"GGUF"

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


class _Cursor:
    def __init__(self, buf: memoryview | bytes, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise ValueError(f"{self.path}: GGUF metadata is truncated at byte {self.pos}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        if len(raw) != n:
            raise ValueError(f"{self.path}: GGUF string at byte {self.pos} runs past the end of the file")
        self.pos += n
        # Vocabulary entries can hold invalid UTF-8 (partial byte pieces); keep them readable.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            if etype == GGUFValueType.STRING:
                return [self.string() for _ in range(count)]
            if etype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        return self.unpack(_SCALAR_FORMATS[vtype])


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as plain Python values (arrays become lists)."""
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(view, path)
            finally:
                view.release()


def _parse(buf: memoryview, path: str) -> dict[str, Any]:
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != _GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (expected magic b'GGUF', found {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (expected 2 or 3, little-endian)")
    cur.unpack("<Q")  # tensor count
    kv_count = cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    return metadata
