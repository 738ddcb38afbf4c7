"""Ahead-of-time compilation of the Triton attention kernels (exllamav2/ops/triton/attn_kernels.py) for sm_90
(H100/H200), sm_89 (RTX 4090) and sm_86 (RTX 3090), without a GPU: every tile configuration attn_meta.py uses
compiles to a cubin, and its shared memory fits what one block may use on that architecture. This catches what
the interpreter lets through (tl.dot shapes, types, shared memory)."""

from __future__ import annotations

import sys

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from exllamav2.ops.triton import attn_meta, kernels  # noqa: E402

KERNELS = "exllamav2.ops.triton.attn_kernels"
# the most shared memory one block may use (opt-in), per compute capability
SMEM_LIMIT = {90: 232448, 89: 101376, 86: 101376}
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@pytest.fixture(scope="module")
def compiled_kernels():
    """The kernel module decorated for compilation (not the interpreter), dropped afterwards so that interpreter
    tests re-import it."""
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    sys.modules.pop(KERNELS, None)
    yield kernels("attn_kernels")
    sys.modules.pop(KERNELS, None)
    mp.undo()


def _signature(fn, pointer_types: dict, ints=(), floats=()):
    sig = {}
    for name in fn.arg_names:
        if name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in ints or name[0].islower():
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


def _compile(fn, sig, constexprs, cc, cfg_warps, cfg_stages):
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": cfg_warps, "num_stages": cfg_stages})


def _attn_fwd(mod, cc, dtype, head_dim, split, paged, causal=True, mask=False, window=False, softcap=False,
              index="*i32", k_fmt=0, v_fmt=0):
    fn = mod.attn_fwd
    t = DTYPES[dtype]
    # quantized pages (K_FMT / V_FMT != 0): uint8 codes, scales in the activation dtype, an fp32 output
    kt, vt = ("*u8" if k_fmt else t), ("*u8" if v_fmt else t)
    ptrs = {"Q": t, "K": kt, "V": vt, "KScale": t, "VScale": t, "Out": "*fp32" if k_fmt or v_fmt else t,
            "PartO": "*fp32", "PartL": "*fp32", "Mask": "*u8"}
    ptrs.update({n: "*i32" for n in ("q_starts", "q_lens", "part_base", "tile_seq", "tile_m")})
    # block tables and lengths: int32 from PagedParams, int64 as the decode-only params hold them
    ptrs.update({"block_table": index, "kv_lens": index})
    sig = _signature(fn, ptrs, floats=("scale", "softcap"))
    cfg = attn_meta.tile_config(head_dim, split, 4 if dtype == "fp32" else 2)
    const = dict(G=4, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=attn_meta.block_d(head_dim), PAGED=paged,
                 CAUSAL=causal, HAS_MASK=mask, HAS_WINDOW=window, SOFTCAP=softcap, SPLIT=split,
                 MIN_SPLIT=attn_meta.MIN_SPLIT, MAX_SPLITS=attn_meta.MAX_SPLITS, DOT_F32=False, IEEE=dtype == "fp32",
                 WHILE_LOOP=False, K_FMT=k_fmt, V_FMT=v_fmt)
    return _compile(fn, sig, const, cc, cfg.num_warps, cfg.num_stages)


def _check(mod, cc, dtype, d, split, **extra):
    k = _attn_fwd(mod, cc, dtype, d, split, paged=True, **extra)
    assert k.asm.get("cubin"), (cc, dtype, d, split)
    assert k.metadata.shared <= SMEM_LIMIT[cc], (
        f"sm_{cc} {dtype} head dim {d} split={split}: {k.metadata.shared} bytes of shared memory, "
        f"limit {SMEM_LIMIT[cc]}")


def test_paged_kernel_compiles_and_fits_each_arch(compiled_kernels):
    """A few configurations: the full-featured bf16 decode on sm_90, the largest prefill tiles (head dim 256 in
    fp16, 128 in fp32) against the 99 KB of sm_86, an fp16 decode with int64 tables on sm_89."""
    _check(compiled_kernels, 90, "bf16", 128, True, window=True, softcap=True)
    _check(compiled_kernels, 86, "fp16", 256, False)
    _check(compiled_kernels, 89, "fp16", 128, True, index="*i64")
    _check(compiled_kernels, 86, "fp32", 128, False)  # fp32 tiles are smaller, or they would not fit


def test_quantized_pages_compile_and_fit(compiled_kernels):
    """The kernel reading quantized pages (cache_q.py: Q4, Q6 = K8/V4, FP8), with the query and output tiles rotated
    in the kernel: decode on sm_90, prefill on sm_86."""
    _check(compiled_kernels, 90, "fp16", 128, True, k_fmt=4, v_fmt=4, softcap=True)
    _check(compiled_kernels, 86, "bf16", 128, False, k_fmt=8, v_fmt=4, window=True)
    _check(compiled_kernels, 89, "fp16", 64, True, k_fmt=2, v_fmt=2, index="*i64")
    _check(compiled_kernels, 86, "fp16", 256, False, k_fmt=4, v_fmt=4)  # the largest tiles (measured 64 KB)


def test_kv_quant_write_compiles():
    """The quantized cache's write kernel (attn_kv_quant.py: 6-d butterflies, exact division) for 4 and 8 bits."""
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        mod = kernels("attn_kv_quant", interpret=False)
        for bits, t, cc in ((4, "*fp16", 90), (8, "*bf16", 86)):
            sig = _signature(mod.kv_quant_write, {"X": t, "Codes": "*u8", "Scales": t, "slots": "*i64"},
                             floats=("scale_max",))
            k = _compile(mod.kv_quant_write, sig, dict(BITS=bits, BLOCK_R=32, SCALE_BF16=t == "*bf16",
                                                       EXACT_DIV=True), cc, 4, 1)
            assert k.asm.get("cubin"), (bits, t, cc)
    finally:
        mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("cc", [90, 89, 86])
def test_every_tile_config_compiles_and_fits(compiled_kernels, cc):
    """Both sequence classes (split decode, whole-sequence prefill) for head dims 64/96/128/256, fp16 and bf16."""
    for dtype in ("fp16", "bf16"):
        for d in (64, 96, 128, 256):
            for split in (True, False):
                _check(compiled_kernels, cc, dtype, d, split, window=d == 96, softcap=d == 256)
    for d in (64, 128, 256):  # fp32 activations: exact fp32 dots (IEEE, not TF32), smaller tiles
        for split in (True, False):
            _check(compiled_kernels, cc, "fp32", d, split)


def test_contiguous_variant_and_small_kernels_compile(compiled_kernels):
    mod = compiled_kernels
    k = _attn_fwd(mod, 90, "fp16", 128, False, paged=False, causal=False, mask=True, softcap=True)
    assert k.metadata.shared <= SMEM_LIMIT[90]
    # the split combine and the KV write
    ptrs = {"PartO": "*fp32", "PartL": "*fp32", "Out": "*fp16", "part_seq": "*i32", "part_tok": "*i32",
            "kv_lens": "*i32", "q_starts": "*i32"}
    sig = _signature(mod.attn_combine, ptrs)
    for cc in (90,):
        c = _compile(mod.attn_combine, sig, dict(BLOCK_N=64, BLOCK_D=128, MIN_SPLIT=attn_meta.MIN_SPLIT,
                                                  MAX_SPLITS=attn_meta.MAX_SPLITS), cc, 4, 2)
        assert c.asm.get("cubin")
    sig = _signature(mod.kv_write, {"K": "*fp16", "V": "*fp16", "KC": "*fp16", "VC": "*fp16", "slots": "*i64"})
    w = _compile(mod.kv_write, sig, dict(BLOCK_D=128), 89, 1, 1)
    assert w.asm.get("cubin")
