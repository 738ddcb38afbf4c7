"""Ahead-of-time compilation of the GGUF kernels (exllamav2/ops/triton/gguf_kernels.py: AOT_SPECS, the tile sizes
gguf_linear.py launches with) for sm_90 (H100/H200), sm_89 (RTX 4090) and sm_86 (RTX 3090), without a GPU: each
compiles to a cubin whose shared memory fits one block on that architecture. This catches what the interpreter lets
through (tl.dot shapes, types, shared memory). The default suite compiles every block type's matmul for sm_90 and a
sample for the others (~1-2 s a compile); `pytest -m slow` compiles every spec for every architecture."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from exllamav2.ops.triton import kernels  # noqa: E402

# the most shared memory one block may use (opt-in), per compute capability
SMEM_LIMIT = {90: 232448, 89: 101376, 86: 101376}


@pytest.fixture(scope="module")
def compiled():
    return kernels("gguf_kernels", interpret=False)


def _specs(mod, kernel=None, dtype=None, qtype=None):
    code = None if qtype is None else mod.QTYPE_CODES[qtype]
    return [s for s in mod.AOT_SPECS
            if (kernel is None or s["kernel"] == kernel) and (code is None or s["constexprs"]["QTYPE"] == code)
            and (dtype is None or any(v == f"*{dtype}" for k, v in s["signature"].items() if k != "w16"))]


def _compile_and_check(mod, spec, cc):
    fn = getattr(mod, spec["kernel"])
    options = {"num_warps": spec["num_warps"]} if "num_warps" in spec else None
    k = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"]), target=GPUTarget("cuda", cc, 32),
                       options=options)
    label = f"sm_{cc} {spec['kernel']} {spec['constexprs']}"
    assert k.asm.get("cubin"), label
    assert k.metadata.shared <= SMEM_LIMIT[cc], f"{label}: {k.metadata.shared} bytes of shared memory"


def test_specs_cover_every_kernel_type_and_dtype(compiled):
    assert {s["kernel"] for s in compiled.AOT_SPECS} == {"gguf_matmul_partials", "gguf_dequant"}
    for kernel in ("gguf_matmul_partials", "gguf_dequant"):
        for dtype in ("fp16", "bf16"):
            assert len(_specs(compiled, kernel, dtype)) == len(set(compiled.QTYPE_CODES.values()))
    # the token embedding's rows (exllamav2/quant/gguf_embedding.py) decode into fp32
    assert len(_specs(compiled, "gguf_dequant", "fp32")) == len(set(compiled.QTYPE_CODES.values()))
    matmul = _specs(compiled, "gguf_matmul_partials")[0]["constexprs"]
    assert all(matmul[k] == v for k, v in compiled.MATMUL_TILE.items())
    assert min(compiled.MATMUL_TILE.values()) >= 16  # tl.dot needs every dimension >= 16 on a GPU


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                   "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_XXS", "IQ3_S", "IQ1_S"])  # a lattice type per table
def test_every_block_type_compiles_for_sm90(compiled, qtype):
    (spec,) = _specs(compiled, "gguf_matmul_partials", "fp16", qtype)
    _compile_and_check(compiled, spec, 90)


@pytest.mark.parametrize("cc", [89, 86])
def test_kernels_compile_for_ada_and_ampere(compiled, cc):
    (matmul,) = _specs(compiled, "gguf_matmul_partials", "bf16", "Q5_K")
    (dequant,) = _specs(compiled, "gguf_dequant", "fp16", "Q6_K")
    (rows,) = _specs(compiled, "gguf_dequant", "fp32", "IQ4_XS")
    for spec in (matmul, dequant, rows):
        _compile_and_check(compiled, spec, cc)


@pytest.mark.slow
@pytest.mark.parametrize("cc", [90, 89, 86])
def test_every_spec_compiles_and_fits(compiled, cc):
    for spec in compiled.AOT_SPECS:
        _compile_and_check(compiled, spec, cc)
