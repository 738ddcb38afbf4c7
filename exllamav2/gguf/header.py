"""The header of a GGUF file: version, metadata key/values, tensor infos, alignment and where the tensor data starts.

Read directly from a memory map: struct for scalars, one numpy array per numeric array, a Python list per string
array; the value-type and ggml-type codes and block sizes come from the `gguf` package. (`gguf.GGUFReader` builds a
numpy view per array element, about a million for a 262k-token vocabulary: seconds per open.) Every read is checked
against the file size first, so a damaged header is a GGUFError naming the file and field, never a huge allocation."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .errors import GGUFError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_ARRAY_DEPTH = 8  # arrays of arrays are legal GGUF; bound the recursion a corrupt file could ask for

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32,
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: _U64,
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_DTYPES = {vtype: np.dtype(s.format) for vtype, s in _SCALARS.items()}
# the fewest bytes one array item of each type takes: a string is its u64 length, an array its type and count
_MIN_ITEM_BYTES = {**{vtype: s.size for vtype, s in _SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, ggml type, offset


@dataclass(frozen=True, eq=False)
class GGUFField:
    """One metadata key/value. `value`: a Python scalar or str; for an ARRAY, a read-only numpy array (numbers),
    a list of str, or a list of such values (arrays of arrays); `item_type` is then the array's element type."""
    name: str
    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None

    def contents(self) -> Any:
        """The value as plain Python values (arrays as lists), as gguf.ReaderField.contents() gives it, except
        that arrays of arrays stay nested (ReaderField flattens them)."""
        return _plain(self.value)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value] if value and not isinstance(value[0], str) else list(value)
    return value


@dataclass(frozen=True)
class GGUFTensorInfo:
    """A tensor as the header describes it. `shape` is in GGUF order (innermost dimension first), `data_offset` the
    absolute byte offset of its data in the file, `n_bytes` its stored size."""
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data: metadata `fields` in file order, `tensors` (infos only, no data)."""
    path: str
    version: int
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int  # the aligned start of the tensor data section
    file_size: int

    def metadata(self) -> dict[str, Any]:
        """All key/values as plain Python values."""
        return {key: field.contents() for key, field in self.fields.items()}


def map_file(path: str) -> np.memmap:
    """The whole file as a read-only uint8 memory map (header and tensor data are views of it)."""
    if os.path.getsize(path) == 0:
        raise GGUFError(f"{path}: not a GGUF file (the file is empty)")
    return np.memmap(path, dtype=np.uint8, mode="r")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file (tensor data is neither read nor checked: see tensors.read_gguf)."""
    path = os.fspath(path)
    return parse_header(map_file(path), path)


def parse_header(file: np.ndarray, path: str) -> GGUFHeader:
    """The header of the GGUF file whose bytes are `file` (uint8); `path` names it in errors."""
    cur = _Cursor(memoryview(file), path)
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (expected magic {MAGIC!r}, found {magic!r})")
    cur.pos = 4
    version = cur.scalar(_U32, "version")
    if version & 0xFFFF == 0:
        raise GGUFError(f"{path}: big-endian GGUF file (version field reads {version:#x}); only little-endian "
                        f"GGUF files are supported")
    if version not in VERSIONS:
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
    tensor_count = cur.scalar(_U64, "tensor count")
    kv_count = cur.scalar(_U64, "metadata count")
    need = kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES
    if need > cur.left:
        raise GGUFError(f"{path}: the header claims {kv_count} metadata entries and {tensor_count} tensors, at least "
                        f"{need} bytes, but {cur.left} bytes follow; the file is truncated or corrupt")

    fields: dict[str, GGUFField] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key #{i}")
        if key in fields:
            raise GGUFError(f"{path}: metadata key '{key}' appears twice")
        fields[key] = cur.field(key)

    raw_tensors = [cur.tensor_info(i) for i in range(tensor_count)]
    alignment = _alignment(path, fields.get("general.alignment"))
    data_start = -(-cur.pos // alignment) * alignment

    tensors, names = [], set()
    for name, tensor_type, shape, offset in raw_tensors:
        if name in names:
            raise GGUFError(f"{path}: tensor '{name}' appears twice")
        names.add(name)
        tensors.append(_tensor_info(path, name, tensor_type, shape, data_start + offset))
    return GGUFHeader(path, version, fields, tensors, alignment, data_start, cur.size)


def _alignment(path: str, field: GGUFField | None) -> int:
    if field is None:
        return GGUF_DEFAULT_ALIGNMENT
    if field.type != GGUFValueType.UINT32:
        raise GGUFError(f"{path}: metadata 'general.alignment' is {field.type.name}, expected UINT32")
    if field.value <= 0 or field.value & (field.value - 1):
        raise GGUFError(f"{path}: metadata 'general.alignment' is {field.value}, expected a power of two")
    return field.value


def _tensor_info(path: str, name: str, tensor_type: GGMLQuantizationType, shape: tuple[int, ...],
                 data_offset: int) -> GGUFTensorInfo:
    block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
    if shape and shape[0] % block_size:
        raise GGUFError(f"{path}: tensor '{name}' rows hold {shape[0]} values, not a multiple of the "
                        f"{tensor_type.name} block size {block_size}")
    n_elements = math.prod(shape)
    return GGUFTensorInfo(name, tensor_type, shape, n_elements, n_elements // block_size * block_bytes, data_offset)


class _Cursor:
    """Little-endian reads from the file's bytes; a read past the end is a GGUFError naming the file and field."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes; returns where they start."""
        start = self.pos
        if n > self.size - start:
            raise GGUFError(f"{self.path}: {what} at byte {start} needs {n} bytes but the file has {self.size}; "
                            f"the file is truncated or corrupt")
        self.pos = start + n
        return start

    def scalar(self, s: struct.Struct, what: str) -> Any:
        return s.unpack_from(self.buf, self.take(s.size, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(_U64, what)
        start = self.take(n, what)
        # vocabulary pieces can be partial UTF-8 sequences; keep them readable
        return str(self.buf[start:start + n], "utf-8", "replace")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar(_U32, what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(f"{self.path}: {what} has unknown GGUF value type {raw}; the file is corrupt") from None

    def field(self, key: str) -> GGUFField:
        what = f"metadata '{key}'"
        vtype = self.value_type(what)
        if vtype == GGUFValueType.ARRAY:
            item_type, value = self.array(what, 0)
            return GGUFField(key, vtype, value, item_type)
        if vtype == GGUFValueType.STRING:
            return GGUFField(key, vtype, self.string(what))
        return GGUFField(key, vtype, self.scalar(_SCALARS[vtype], what))

    def array(self, what: str, depth: int) -> tuple[GGUFValueType, Any]:
        item_type = self.value_type(what)
        count = self.scalar(_U64, what)
        if count * _MIN_ITEM_BYTES[item_type] > self.left:
            raise GGUFError(f"{self.path}: {what} claims {count} {item_type.name} items but {self.left} bytes follow; "
                            f"the file is truncated or corrupt")
        if item_type == GGUFValueType.STRING:
            return item_type, self.strings(count, what)
        if item_type == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            return item_type, [self.array(what, depth + 1)[1] for _ in range(count)]
        dtype = _DTYPES[item_type]
        start = self.take(count * dtype.itemsize, what)
        return item_type, np.frombuffer(self.buf, dtype, count, start)

    def strings(self, count: int, what: str) -> list[str]:
        # the hot loop of a large vocabulary: local names, and one bounds check at the end (a slice past the end
        # only comes back short, and reading a length past the end raises struct.error)
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out: list[str] = [""] * count
        try:
            for i in range(count):
                n = unpack(buf, pos)[0]
                pos += 8
                out[i] = str(buf[pos:pos + n], "utf-8", "replace")
                pos += n
        except struct.error:
            pos = self.size + 1
        if pos > self.size:
            raise GGUFError(f"{self.path}: {what}: its strings run past the end of the file ({self.size} bytes); "
                            f"the file is truncated or corrupt")
        self.pos = pos
        return out

    def tensor_info(self, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        """(name, ggml type, shape innermost first, offset from the data section's start)."""
        name = self.string(f"tensor info #{i} name")
        what = f"tensor '{name}'"
        n_dims = self.scalar(_U32, what)
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, what))
        raw_type = self.scalar(_U32, what)
        try:
            tensor_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{self.path}: {what} has unknown ggml type {raw_type}") from None
        if tensor_type not in GGML_QUANT_SIZES:
            raise GGUFError(f"{self.path}: {what} has ggml type {tensor_type.name}, which has no known block size")
        return name, tensor_type, dims, self.scalar(_U64, what)
