"""A token embedding kept in a GGUF file's own blocks: a forward dequantises only the rows it looks up (gguf-py's
`dequantize` over those rows, as llama.cpp's get_rows does), instead of a dense (vocab, hidden) copy made at load.
Gemma-3-270M's 262k x 640 Q8_0 table is 178 MB in the file and was 335 MB more in bf16 (and 2.2 s of its load);
a Llama-3-8B Q4_K_M's would be ~1 GB. The rows come out as the dense load's would: the same fp32 values, cast to
the model's dtype once.

On the CPU the lookup reads the file's memory map: the C++ op `exllamav2_cpu::gguf_rows` (csrc/gguf_rows.cpp, the
same values) where the CPU kernels are loaded, else gguf-py under a custom op (`exllamav2::gguf_rows`), so the
compiled decode step calls either as one opaque node (the gguf-py path cost ~160 us of a ~2.6 ms SmolLM2 step). On a GPU the table is the file's bytes on the device: the ids' rows are gathered
(`index_select`) and decoded by the Triton GGUF kernels' `gguf_dequant` (exllamav2/ops/triton/gguf_kernels.py,
bit for bit gguf-py's values), with no host sync, so a captured decode graph holds it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from ..ops.cpu import kernels as cpu_kernels
from .gguf import lattice_on_device
from .gguf_blocks import LATTICE_TYPES, PACKED_TYPES


def host_rows(blocks: torch.Tensor, ids: torch.Tensor, qtype: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """blocks: uint8 (vocab, bytes per row) of GGUF type `qtype`; ids: int64, any shape -> (*ids.shape, width)."""
    flat = ids.reshape(-1).numpy()
    rows = dequantize(blocks.numpy()[flat], GGMLQuantizationType(qtype)).reshape(flat.shape[0], width)
    return torch.from_numpy(rows).to(dtype).reshape(*ids.shape, width)


# the op for traced code only: an eager call through it would import dynamo on first use (~1 s, custom_op's
# implementations run under torch._disable_dynamo)
gguf_rows = torch.library.custom_op("exllamav2::gguf_rows", mutates_args=())(host_rows)


@gguf_rows.register_fake
def _gguf_rows_fake(blocks, ids, qtype, width, dtype):
    return ids.new_empty((*ids.shape, width), dtype=dtype)


class GgufEmbeddingTable:
    """The (vocab, hidden) table of one GGUF tensor, rows dequantised on lookup."""

    def __init__(self, name: str, qtype: str, blocks: np.ndarray, shape: tuple[int, int],
                 device: torch.device | str = "cpu", triton: bool = False):
        """triton: decode with the Triton kernels (on a GPU; on CPU tensors under TRITON_INTERPRET=1)."""
        vocab, width = shape
        if blocks.shape[0] != vocab:
            raise ValueError(f"{name}: {qtype} data holds {blocks.shape[0]} rows, expected {vocab}")
        with warnings.catch_warnings():
            # the file's read-only memory map, shared, never written: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            self.blocks = torch.from_numpy(blocks)
        self.triton = triton or torch.device(device).type != "cpu"
        if self.triton:
            from ..ops.triton import interpreting, kernels
            if qtype in LATTICE_TYPES:   # 4-bit table blocks (quant/gguf.py: device_blocks)
                self.blocks = cpu_kernels.lut_blocks(qtype, self.blocks)
            self.blocks = self.blocks.to(device, copy=True)
            self.k = kernels("gguf_kernels", torch.device(device).type == "cpu" and interpreting())
            self.triton_code = self.k.QTYPE_CODES[qtype]
        self.qtype, self.code = qtype, int(GGMLQuantizationType[qtype])
        self.native = qtype in cpu_kernels.GGUF_KINDS   # the C++ lookup decodes this type
        self.grid = cpu_kernels.lattice_grid(qtype)      # its grid, for the lattice types
        self.vocab, self.width = vocab, width

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.triton:
            return self._triton_rows(ids.to(self.blocks.device, torch.int64), dtype)
        if self.native and cpu_kernels.loaded_usable():
            return cpu_kernels.gguf_rows(self.blocks, ids.to("cpu", torch.int64), self.qtype, self.width, dtype,
                                         self.grid)
        if not torch.compiler.is_compiling():
            bad = (ids >= self.vocab)
            if bad.any():
                raise IndexError(f"token id {int(ids[bad][0])} is out of range for the embedding's {self.vocab} rows")
        op = torch.ops.exllamav2.gguf_rows if torch.compiler.is_compiling() else host_rows
        return op(self.blocks, ids.to("cpu", torch.int64), self.code, self.width, dtype)

    def _triton_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from ..ops.triton.linear import triton_cdiv
        flat = ids.reshape(-1)
        rows = self.blocks.index_select(0, flat)                     # (n, bytes per row), on the device
        n = rows.shape[0]
        # fp32 out, cast by torch: the host path's single rounding (the interpreter's own bf16 store truncates)
        out = torch.empty(self.width, n, dtype=torch.float32, device=rows.device)   # the kernel writes (in, out)
        tile = self.k.DEQUANT_TILE
        grid = (triton_cdiv(self.width, tile["BLOCK_K"]), triton_cdiv(n, tile["BLOCK_N"]))
        self.k.gguf_dequant[grid](rows, rows.view(torch.float16), out, n, self.width, rows.shape[1], out.stride(0),
                                  QTYPE=self.triton_code, **tile)
        return out.t().to(dtype).reshape(*ids.shape, self.width)

    def nbytes(self) -> int:
        """Bytes this table holds beyond the file's memory map (its copy on a device)."""
        return self.blocks.numel() if self.triton else 0


def gguf_embedding_table(src, name: str, device: torch.device | str = "cpu") -> GgufEmbeddingTable | None:
    """The table of tensor `name` when its source is a GGUF file holding it in a block type, else None."""
    if not hasattr(src, "ggml_type") or src.ggml_type(name) not in PACKED_TYPES:
        return None
    if src.ggml_type(name) in LATTICE_TYPES and torch.device(device).type != "cpu" and not lattice_on_device():
        return None
    qtype, blocks, shape = src.raw(name)
    return GgufEmbeddingTable(name, qtype, blocks, tuple(shape), device)
