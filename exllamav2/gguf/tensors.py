"""A GGUF file's tensors as views of one read-only memory map of the file, laid out as gguf.GGUFReader lays them out."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GGUFError
from .header import GGUFHeader, GGUFTensorInfo, map_file, parse_header

# gguf.GGUFReader's choice, kept so `data` reads the same: these types as their numpy dtype in the reversed GGUF
# shape; every other type (BF16 included) as its stored bytes, uint8 (..., bytes per row).
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True, eq=False)
class GGUFTensor(GGUFTensorInfo):
    """A tensor info and its data, a read-only view of the file's memory map."""
    data: np.ndarray


def read_gguf(path: str | os.PathLike) -> tuple[GGUFHeader, list[GGUFTensor]]:
    """The header and the tensors of a GGUF file; a tensor whose data runs past the end of the file is a GGUFError."""
    path = os.fspath(path)
    file = map_file(path)
    header = parse_header(file, path)
    return header, [_tensor(path, file, info) for info in header.tensors]


def _tensor(path: str, file: np.memmap, info: GGUFTensorInfo) -> GGUFTensor:
    end = info.data_offset + info.n_bytes
    if end > file.size:
        raise GGUFError(f"{path}: tensor '{info.name}' ends at byte {end} but the file has {file.size} bytes; "
                        f"the file is truncated")
    shape = tuple(reversed(info.shape))
    dtype = _ELEMENT_DTYPES.get(info.tensor_type)
    if dtype is None:
        dtype = np.uint8
        block_size, block_bytes = GGML_QUANT_SIZES[info.tensor_type]
        shape = (*shape[:-1], shape[-1] // block_size * block_bytes) if shape else (info.n_bytes,)
    data = file[info.data_offset:end].view(dtype).reshape(shape)
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(GGUFTensorInfo)}
    return GGUFTensor(**fields, data=data)
