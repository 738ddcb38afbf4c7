"""The C++ CPU kernels as torch custom ops (`torch.ops.exllamav2_cpu.*`, csrc/*.cpp), with fake (meta)
implementations so that dynamo/inductor trace and call them inside the compiled decode step (runtime/decode.py).

`ready()` builds and loads them on first use (build.py); False means the `cpu` backend keeps torch's kernels.
`EXLLAMAV2_CPU_ISA=avx2` (or `set_isa("avx2")`) forces the AVX2 path on an AVX-512 machine, for tests and
comparisons; the default is the best the CPU has.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ...quant.gguf_blocks import LATTICE_TYPES
from . import build

ISA_LEVELS = {"none": 0, "avx2": 1, "avx512": 2}
GGUF_KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q5_0": 4, "Q5_1": 5, "Q5_K": 6, "Q6_K": 7, "Q2_K": 8,
              "Q3_K": 9, "IQ4_NL": 10, "IQ4_XS": 11, "IQ2_XXS": 12, "IQ2_XS": 13, "IQ2_S": 14, "IQ3_XXS": 15,
              "IQ3_S": 16, "IQ1_S": 17, "IQ1_M": 18}
# the lattice types (quant/gguf_blocks.py) are decoded through their grids (lattice_grid), which the decoding ops
# take as an argument


@functools.cache
def lattice_grid(qtype: str) -> torch.Tensor | None:
    """The grid of a lattice type as uint8 (entries, 8 or 4) indices into its grid values (IQ2: 8, 25, 43; IQ3_XXS:
    4 .. 62; IQ3_S: 1 .. 15; IQ1_S, IQ1_M: -1, 0, 1), read from gguf-py's definition of the type (its hex string packs
    ceil(log2(values)) bits an index); None for the other types."""
    if qtype not in LATTICE_TYPES:
        return None
    from gguf import quants
    cls = getattr(quants, qtype)   # gguf-py's class of the type, which holds its grid
    bits = max(1, (len(cls.grid_map) - 1).bit_length())
    per_byte = 8 // bits
    step = 8 // per_byte
    raw = np.frombuffer(bytes.fromhex(cls.grid_hex.decode()), dtype=np.uint8)
    idx = np.stack([(raw >> (e * step)) & ((1 << bits) - 1) for e in range(per_byte)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(idx.reshape(cls.grid_shape)))
GROUP_ROWS = 16   # output rows per interleaved group of the GGUF layout (csrc/gemv.cpp)
BLOCK = 32        # columns per GGUF block

_registered = False


def _register_fakes() -> None:
    global _registered
    if _registered:
        return

    @torch.library.register_fake("exllamav2_cpu::gguf_gemv")
    def _gguf_gemv_fake(x, qweight, kind, n, bias, super_scales=None, act_stages=2):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("exllamav2_cpu::gguf_dequant")
    def _gguf_dequant_fake(qweight, kind, n, k, dtype, super_scales=None):
        return qweight.new_empty((n, k), dtype=dtype)

    @torch.library.register_fake("exllamav2_cpu::gguf_rows")
    def _gguf_rows_fake(raw, ids, kind, k, dtype, grid=None):
        return raw.new_empty((*ids.shape, k), dtype=dtype)

    @torch.library.register_fake("exllamav2_cpu::bf16_gemv")
    def _bf16_gemv_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("exllamav2_cpu::dense_gemv")
    def _dense_gemv_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("exllamav2_cpu::rms_norm")
    def _rms_norm_fake(x, weight, eps, out_dtype):
        return x.new_empty(x.shape, dtype=out_dtype)

    @torch.library.register_fake("exllamav2_cpu::gated_activation")
    def _gated_activation_fake(gate, up, act):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("exllamav2_cpu::rope")
    def _rope_fake(x, cos, sin, interleaved):
        return x.new_empty(x.shape)

    @torch.library.register_fake("exllamav2_cpu::rope_kv_write")
    def _rope_kv_write_fake(qk, v, cos, sin, interleaved, k_cache, v_cache, index, q_heads):
        return qk.new_empty((qk.shape[0], qk.shape[1], q_heads, qk.shape[3]))

    @torch.library.register_fake("exllamav2_cpu::decode_attention")
    def _decode_attention_fake(q, k, v, mask, scale, softcap, is_causal):
        b, hq, s, d = q.shape
        return q.new_empty((b, s, hq, d)).transpose(1, 2)  # the kernel's layout (csrc/attention.cpp)

    @torch.library.register_fake("exllamav2_cpu::quant_paged_decode_attention")
    def _quant_paged_decode_attention_fake(q, k_codes, k_scales, v_codes, v_scales, k_fmt, v_fmt, block_index,
                                           kv_lens, page_size, sliding_window, scale, softcap):
        return q.new_empty(q.shape)

    @torch.library.register_fake("exllamav2_cpu::quant_kv_write")
    def _quant_kv_write_fake(k, v, k_codes, k_scales, v_codes, v_scales, k_fmt, v_fmt, slots):
        return None

    @torch.library.register_fake("exllamav2_cpu::paged_decode_attention")
    def _paged_decode_attention_fake(q, kflat, vflat, block_index, kv_lens, page_size, sliding_window, scale,
                                     softcap):
        return q.new_empty(q.shape)

    _registered = True


def ready(progress: bool = True) -> bool:
    """True when the kernels are built, loaded and this CPU runs one of their paths (AVX-512 or AVX2)."""
    if not build.load_library(progress):
        return False
    _register_fakes()
    if "best_isa" not in build._state:
        build._state["best_isa"] = isa()  # what the CPU has, before any override
    if "isa_env" not in build._state:
        build._state["isa_env"] = True
        env = os.environ.get("EXLLAMAV2_CPU_ISA", "").strip().lower()
        if env and env != "auto":
            set_isa(env, source="EXLLAMAV2_CPU_ISA")
    return isa() != "none"


def decoders_ready(progress: bool = True) -> bool:
    """True when the kernels' library is loaded (built at first use): enough for the block decoders (gguf_pack,
    gguf_rows, gguf_lut_blocks), which are scalar code, where ready() also needs AVX2 or AVX-512 for the GEMVs."""
    if not build.load_library(progress):
        return False
    _register_fakes()
    return True


def loaded_usable() -> bool:
    """True when ready() has loaded the kernels on a CPU that runs one of their paths: a dict lookup, for code
    traced by dynamo (False before ready() ran; set_isa never selects 'none')."""
    return build._state.get("ok", False) and build._state.get("best_isa", "none") != "none"


def loaded_with_avx512() -> bool:
    """True when ready() has loaded the kernels on a CPU with AVX-512: a dict lookup, so that code traced by
    dynamo can ask without a graph break (it never builds; False before ready() ran)."""
    return build._state.get("ok", False) and build._state.get("best_isa") == "avx512"


def isa() -> str:
    """The instruction set the kernels use now: 'avx512', 'avx2' or 'none'."""
    level = torch.ops.exllamav2_cpu.isa()
    return next(k for k, v in ISA_LEVELS.items() if v == level)


def set_isa(name: str, source: str = "set_isa") -> None:
    """Use 'avx2' (or 'avx512', when the CPU has it) from now on in this process."""
    if name not in ISA_LEVELS or name == "none":
        raise ValueError(f"{source}: instruction set '{name}' is unknown; expected avx2, avx512 or auto")
    try:
        torch.ops.exllamav2_cpu.set_isa(ISA_LEVELS[name])
    except RuntimeError as e:
        raise ValueError(f"{source}: {name} is not available on this CPU ({e})") from e
    build._state["isa_now"] = isa()


def active_avx512() -> bool:
    """True when the kernels are loaded and run their AVX-512 path now (set_isa may have chosen AVX2): a dict
    lookup, for the eager small ops' per-call choice."""
    return build._state.get("ok", False) and build._state.get("isa_now", build._state.get("best_isa")) == "avx512"


def gguf_gemv(x: torch.Tensor, packed, bias: torch.Tensor | None = None, act_stages: int = 2) -> torch.Tensor:
    """x (rows, K) -> (rows, N) in x's dtype, for a GgufPacked matrix (gguf_pack.py). act_stages: 2 quantises x
    to int8 plus its rounding residual (~1e-5 relative error), 1 to int8 alone (llama.cpp's q8_0 activations, half
    the dot products; ops.set_cpu_activations)."""
    return torch.ops.exllamav2_cpu.gguf_gemv(x, packed.qweight, packed.kind, packed.out_features, bias,
                                             packed.super_scales, act_stages)


def gguf_dequant(packed, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.exllamav2_cpu.gguf_dequant(packed.qweight, packed.kind, packed.out_features,
                                                packed.in_features, dtype, packed.super_scales)


def lut_blocks(qtype: str, raw: torch.Tensor) -> torch.Tensor:
    """A lattice type's rows, raw uint8 (rows, bytes per row), re-encoded as 4-bit table blocks of 146 bytes per 256
    weights (csrc/gguf_lut_blocks.cpp: fp16 d, 16 odd scale factors, 128 bytes of codes), which the Triton GGUF
    kernels decode (exllamav2/ops/triton/gguf_kernels.py: _decode_lut4); the same weights. Builds the kernels'
    library at first use; a RuntimeError where it cannot (quant/gguf.py's lattice_on_device asks first)."""
    from ...quant.gguf_blocks import BLOCK_GEOMETRY
    if not decoders_ready():
        raise RuntimeError(f"GGUF {qtype} is re-encoded for the GPU by the CPU kernels, which are not available "
                           f"here ({build.disabled_reason() or 'the build failed'})")
    n, row_bytes = raw.shape
    per, bb = BLOCK_GEOMETRY[qtype]
    return torch.ops.exllamav2_cpu.gguf_lut_blocks(raw, GGUF_KINDS[qtype], n, row_bytes // bb * per,
                                                   lattice_grid(qtype))


def gguf_rows(raw: torch.Tensor, ids: torch.Tensor, qtype: str, width: int, dtype: torch.dtype,
              grid: torch.Tensor | None) -> torch.Tensor:
    """Rows `ids` (int64, any shape) of a GGUF matrix held as its file's bytes, raw uint8 (rows, bytes per row) of
    GGUF_KINDS type `qtype` -> (*ids.shape, width) in dtype: gguf-py's values rounded once (csrc/gguf_rows.cpp).
    grid: lattice_grid(qtype), fetched by the caller ahead (not inside a traced step)."""
    return torch.ops.exllamav2_cpu.gguf_rows(raw, ids, GGUF_KINDS[qtype], width, dtype, grid)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, K) bf16, weight (N, K) bf16 row-major (the module's own tensor) -> (rows, N) bf16."""
    return torch.ops.exllamav2_cpu.bf16_gemv(x, weight, bias)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, K) and weight (N, K) row-major, both bf16, fp16 or fp32 -> (rows, N) in that dtype; each row computed
    alone (the same for any number of rows)."""
    return torch.ops.exllamav2_cpu.dense_gemv(x, weight, bias)
