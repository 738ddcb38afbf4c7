"""The C++ CPU kernels (exllamav2/ops/cpu/csrc/gemv.cpp) against the reference: GGUF Q4_0/Q4_1/Q8_0 GEMV and the
bf16 GEMV, on ragged shapes and 1..8 rows (and more, in chunks of 8), batch invariance, the AVX2 path, and the
model's linears picking them up. Build, fallback and compile checks: tests/test_cpu_kernels_build.py.

Tolerances, and why:
- GGUF, fp32 activations against x @ dequantised(W).T in fp32: relative 1e-4 of the output's largest value. The
  weights are exact (same fp16 scales, same codes); the activations go through two int8 stages per 32-column block
  (error ~1e-5 relative, see gemv.cpp); the rest is fp32 summation order.
- GGUF and bf16 with bf16 outputs: relative 1e-2 in norm, against the `torch` backend on the same bf16 inputs;
  dominated by the single rounding of each output to bf16 (2^-8 relative), as F.linear's own.
- Q4_K: the layout round-trips to gguf-py's own dequantisation exactly; the GEMV as for the others (1e-4).
- AVX2 against AVX-512 on GGUF: bit-identical (the integer dot products are exact on both paths and the fp32 steps
  are the same operations in the same order); on bf16 the AVX2 path sums 8-wide in fp32 FMAs instead of
  vdpbf16ps pairs: relative 1e-5 of the largest value before the bf16 rounding, so compared in fp32 inputs' terms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exllamav2.ops.cpu import kernels

if not kernels.ready():
    pytest.skip("the CPU kernels cannot be built here (see the line above)", allow_module_level=True)

from exllamav2.ops.cpu.gemv_linear import GEMV_MAX_ROWS  # noqa: E402
from exllamav2.ops.cpu.gguf_pack import pack_gguf_blocks  # noqa: E402
from exllamav2.quant.gguf_blocks import decode_blocks, dequantize_digits  # noqa: E402

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SHAPES = [(64, 128), (37, 96), (100, 224), (960, 576)]   # ragged N (not a multiple of 16) and K/32 odd


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks (n, k/32 * block bytes) with random codes and realistic fp16 scales/offsets."""
    g = np.random.default_rng(seed)
    nb, bb = k // 32, BLOCK_BYTES[qtype]
    raw = g.integers(0, 256, (n, nb, bb), dtype=np.uint8)
    raw[..., 0:2] = (g.random((n, nb)) * 0.02 + 0.001).astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    if qtype == "Q4_1":
        raw[..., 2:4] = (-g.random((n, nb)) * 0.1).astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * bb)


@pytest.fixture(autouse=True)
def best_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gguf_gemv_equals_dequantised_matmul(qtype, shape):
    n, k = shape
    raw = random_blocks(qtype, n, k, seed=n + k)
    packed = pack_gguf_blocks(qtype, raw, shape)
    w = dequantize_digits(decode_blocks(qtype, raw, shape))
    # exactly the file's bytes per block, for the rows padded to a multiple of 16
    assert packed.nbytes() == -(-n // 16) * 16 * (k // 32) * BLOCK_BYTES[qtype]
    # the layout round-trips exactly
    assert torch.equal(kernels.gguf_dequant(packed, torch.float32), w)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g)
    for rows in (*range(1, GEMV_MAX_ROWS + 1), 13):
        x = torch.randn(rows, k, generator=g)
        ref = x @ w.t() + bias
        got = kernels.gguf_gemv(x, packed, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (rows, (got - ref).abs().max())
        xb = x.bfloat16()
        got_b = kernels.gguf_gemv(xb, packed, bias.bfloat16()).float()
        ref_b = F.linear(xb, w.bfloat16(), bias.bfloat16()).float()
        assert (got_b - ref_b).norm() <= 1e-2 * ref_b.norm()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_gemv_is_batch_invariant_and_avx2_gives_the_same_bits(qtype):
    n, k = 100, 224
    packed = pack_gguf_blocks(qtype, random_blocks(qtype, n, k, seed=3), (n, k))
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(4)).bfloat16()
    results = {}
    for isa in ("avx512", "avx2") if kernels.isa() == "avx512" else (kernels.isa(),):
        kernels.set_isa(isa)
        together = kernels.gguf_gemv(x, packed)
        for rows in range(1, 20):
            # each row alone, and the first `rows` rows together: bit-identical to the 19-row call
            assert torch.equal(kernels.gguf_gemv(x[rows - 1:rows], packed), together[rows - 1:rows])
            assert torch.equal(kernels.gguf_gemv(x[:rows], packed), together[:rows])
        results[isa] = together
    if len(results) == 2:
        assert torch.equal(results["avx512"], results["avx2"])


@pytest.mark.parametrize("act_stages", [2, 1])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q2_K", "Q3_K",
                                   "IQ4_NL", "IQ4_XS"])
def test_gguf_gemv_gives_each_row_its_one_row_result_for_any_row_count_isa_and_threads(qtype, act_stages):
    """Prefill and batched decode go through the same kernels as one row (chunks of 8 rows, the rows side by side
    in the quantised activations; past 8 rows on AVX-512, two 16-row groups per call): every row of an R-row call
    (R = 1..40, the ragged last chunk and the odd last group included) must be bit-identical to that row alone, on
    1 and 2 threads, AVX-512 and AVX2, in both activation modes; and the dtype readers and the stores must equal
    the fp32 call's values rounded by torch (x16/bf16 in, same dtype out)."""
    n, k = 100, 512   # 7 groups (the last one ragged), 16 blocks (2 Q4_K super-blocks)
    raw = random_raw(qtype, n, k, seed=5)
    packed = pack_gguf_blocks(qtype, raw, (n, k))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, k, generator=g)
    bias = torch.randn(n, generator=g)
    threads = torch.get_num_threads()
    results = {}
    try:
        for isa in ("avx512", "avx2") if kernels.isa() == "avx512" else (kernels.isa(),):
            kernels.set_isa(isa)
            for nthreads in (1, 2):
                torch.set_num_threads(nthreads)
                together = kernels.gguf_gemv(x, packed, bias, act_stages)
                for rows in range(1, 41):
                    assert torch.equal(kernels.gguf_gemv(x[rows - 1:rows], packed, bias, act_stages), together[rows - 1:rows]), \
                        (isa, nthreads, rows)
                    assert torch.equal(kernels.gguf_gemv(x[:rows], packed, bias, act_stages), together[:rows]), (isa, nthreads, rows)
                for dtype in (torch.bfloat16, torch.float16):
                    xd = x.to(dtype)
                    want = kernels.gguf_gemv(xd.float(), packed, bias.to(dtype).float(), act_stages).to(dtype)
                    got = kernels.gguf_gemv(xd, packed, bias.to(dtype), act_stages)
                    assert got.dtype == dtype and torch.equal(got, want), (isa, nthreads, dtype)
                    for rows in (1, 9, 17, 33):
                        assert torch.equal(kernels.gguf_gemv(xd[rows - 1:rows], packed, bias.to(dtype), act_stages),
                                           got[rows - 1:rows])
                results[isa, nthreads] = together
    finally:
        torch.set_num_threads(threads)
    first = next(iter(results.values()))
    assert all(torch.equal(r, first) for r in results.values()), list(results)


def test_vector_activation_quantisers_equal_the_scalar_contract(tmp_path):
    """tests/cpp/gguf_quantize_check.cpp: the AVX-512 and AVX2 quantisers (fp32/bf16/fp16 in) bit-identical to
    gguf_gemv_kernels.h's scalar quantize_row, built with the kernels' own flags."""
    import shutil
    import subprocess
    from pathlib import Path
    from exllamav2.ops.cpu.build import find_compiler
    if kernels.isa() == "none" or shutil.which(find_compiler()) is None:
        pytest.skip("needs AVX2 and a C++ compiler")
    src = Path(__file__).parent / "cpp" / "gguf_quantize_check.cpp"
    exe = tmp_path / "gguf_quantize_check"
    subprocess.run([find_compiler(), "-O2", "-std=c++20", "-ffp-contract=off", "-mf16c", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr


def random_raw(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks (n, k / block * block bytes) of any packed type: random codes, high bits and (6- or 8-bit)
    sub-block scales, realistic fp16 d (and m / dmin)."""
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY, F16_FIELDS, set_block_d
    per, bb = BLOCK_GEOMETRY[qtype]
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, (n, k // per, bb), dtype=np.uint8)
    _, m_at = F16_FIELDS[qtype]
    big = per == 256   # super-block d multiplies 6- or 8-bit sub-block scales
    d = g.random((n, k // per)) * (0.002 if big else 0.02) + (1e-4 if big else 1e-3)
    set_block_d(qtype, raw, d)
    if m_at is not None:
        m = g.random((n, k // per)) * (0.005 if big else -0.1)
        raw[..., m_at:m_at + 2] = m.astype(np.float16).view(np.uint8).reshape(n, k // per, 2)
    return raw.reshape(n, -1)


LATTICE = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
NEW_KINDS = ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"] + LATTICE
# packed bytes per 256 weights: the file's, except the 6-bit scales as bytes (Q4_K/Q5_K: 12 bytes of scales and
# mins as 16 + 16; Q3_K: 12 as 16; IQ4_XS: 6 as 8 and 8 unused; the lattice types: 4-bit table codes, 16 bytes of
# odd scale factors, 2 of d: 2.2x IQ2_XXS's 66, 1.5x IQ3_XXS's 98)
PACKED_BYTES_PER_256 = {"Q4_K": 148, "Q5_K": 180, "Q6_K": 210, "Q5_0": 176, "Q5_1": 192, "Q2_K": 84, "Q3_K": 114,
                        "IQ4_NL": 144, "IQ4_XS": 146, **{t: 146 for t in LATTICE}}


@pytest.mark.parametrize("qtype", NEW_KINDS)
@pytest.mark.parametrize("shape", [(37, 256), (100, 768), (16, 512)])
def test_kquant_and_q5_gemv_equals_gguf_dequantisation(qtype, shape):
    """The layout round-trips to gguf-py's own dequantisation exactly; the GEMV against x @ W.T within 1e-4 of
    the largest output; AVX2 bit-identical to AVX-512; rows independent of the call's row count."""
    from gguf import GGMLQuantizationType, quants
    n, k = shape
    raw = random_raw(qtype, n, k, seed=n + len(qtype))
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qtype]).copy()).reshape(n, k)
    packed = pack_gguf_blocks(qtype, raw, shape)
    assert torch.equal(kernels.gguf_dequant(packed, torch.float32), w)
    assert packed.nbytes() == -(-n // 16) * 16 * k // 256 * PACKED_BYTES_PER_256[qtype]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, k, generator=g)
    ref = x @ w.t()
    results = {}
    for isa in ("avx512", "avx2") if kernels.isa() == "avx512" else (kernels.isa(),):
        kernels.set_isa(isa)
        got = kernels.gguf_gemv(x, packed)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (isa, (got - ref).abs().max())
        for rows in (1, 3, 8):
            assert torch.equal(kernels.gguf_gemv(x[rows - 1:rows], packed), got[rows - 1:rows])
            assert torch.equal(kernels.gguf_gemv(x[:rows], packed), got[:rows])
        results[isa] = got
    if len(results) == 2:
        assert torch.equal(results["avx512"], results["avx2"])


@pytest.mark.parametrize("qtype", NEW_KINDS)
def test_kquant_and_q5_packing_refuses_bad_shapes_naming_the_tensor(qtype):
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY
    per = BLOCK_GEOMETRY[qtype][0]
    n, k = 16, 2 * per
    raw = random_raw(qtype, n, k)
    with pytest.raises(ValueError, match=f"blk.3.w: shape .* multiple of {per} columns"):
        pack_gguf_blocks(qtype, raw[:, :raw.shape[1] // 2], (n, k - per // 2), name="blk.3.w")
    with pytest.raises(ValueError, match=f"blk.3.w: {qtype} data has shape"):
        pack_gguf_blocks(qtype, raw[:, :-1], (n, k), name="blk.3.w")
    packed = pack_gguf_blocks(qtype, raw, (n, k))
    if packed.super_scales is not None:
        with pytest.raises(RuntimeError, match=f"{qtype} needs float16 super-block scales"):
            torch.ops.exllamav2_cpu.gguf_gemv(torch.randn(1, k), packed.qweight, packed.kind, n, None, None)



@pytest.mark.parametrize("shape", [(64, 128), (37, 100), (333, 576), (50, 7)])
def test_bf16_gemv_equals_linear_and_is_batch_invariant(shape):
    n, k = shape
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(GEMV_MAX_ROWS, k, generator=g).bfloat16()
    fp32 = {}
    for isa in ("avx512", "avx2") if kernels.isa() == "avx512" else (kernels.isa(),):
        kernels.set_isa(isa)
        together = kernels.bf16_gemv(x, w, bias)
        ref = F.linear(x, w, bias).float()
        assert (together.float() - ref).norm() <= 1e-2 * ref.norm()
        for rows in range(1, GEMV_MAX_ROWS + 1):
            assert torch.equal(kernels.bf16_gemv(x[rows - 1:rows], w, bias), together[rows - 1:rows])
            assert torch.equal(kernels.bf16_gemv(x[:rows], w, bias), together[:rows])
        # before the bf16 rounding: the exact products of bf16 values, summed in fp32
        fp32[isa] = kernels.bf16_gemv(x, w, None).float()
    exact = x.double() @ w.double().t()
    for got in fp32.values():
        assert (got.double() - exact).abs().max() <= 5e-3 * exact.abs().max()


def test_kernels_reject_bad_inputs_with_clear_errors():
    packed = pack_gguf_blocks("Q4_0", random_blocks("Q4_0", 32, 64), (32, 64))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.gguf_gemv(torch.randn(1, 48), packed)
    with pytest.raises(RuntimeError, match="qweight must be contiguous uint8"):
        kernels.gguf_gemv(torch.randn(1, 96), packed)
    with pytest.raises(RuntimeError, match="weight expects 64"):
        kernels.bf16_gemv(torch.randn(1, 32).bfloat16(), torch.randn(8, 64).bfloat16())
    with pytest.raises(ValueError, match="w.up: Q4_0 data has shape"):
        pack_gguf_blocks("Q4_0", random_blocks("Q4_0", 32, 64)[:, :-1], (32, 64), name="w.up")
    with pytest.raises(ValueError, match="TQ2_0 has no CPU GEMV kernel"):
        pack_gguf_blocks("TQ2_0", random_blocks("Q4_0", 32, 64), (32, 64))
    with pytest.raises(ValueError, match="instruction set 'sse9' is unknown"):
        kernels.set_isa("sse9")


def test_a_gguf_and_a_dense_model_run_their_linears_through_the_kernels(tmp_path):
    from test_gguf_support import write_tiny_gguf

    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Cache, ops
    from exllamav2.ops.cpu.gemv_linear import DenseGemvKernel, GgufGemvKernel
    path = write_tiny_gguf(str(tmp_path / "q4_1.gguf"), qtype="Q4_1", hidden=128, ffn=256, vocab=96)
    cfg = ExLlamaV2Config(path)
    model = ExLlamaV2(cfg)
    model.load()
    attn, mlp = model.modules[1], model.modules[2]
    assert isinstance(attn.qkv.kernel(torch.bfloat16), GgufGemvKernel)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def run(backend):
        with ops.use_backend(backend):
            cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64)
            out = [model.forward(ids[:, :8], cache, last_id_only=True)[:, -1]]
            out += [model.forward(ids[:, i:i + 1], cache)[:, -1] for i in range(8, 12)]
        return torch.stack(out, 1).float()

    ref, got = run("torch"), run("cpu")
    assert (got - ref).abs().max() <= 0.03 * (ref.amax() - ref.amin())
    # dense bf16: the module's own weight, no copy
    w = mlp.down_proj.get_weight().bfloat16().contiguous()
    k = ops.prepare_linear(w, None, None, "cpu", torch.bfloat16)
    assert isinstance(k, DenseGemvKernel) and k.weight is w and k.nbytes() == 0
    x = torch.randn(3, w.shape[1]).bfloat16()
    assert (k(x).float() - F.linear(x, w).float()).norm() <= 1e-2 * F.linear(x, w).float().norm()
    # above the row threshold (prefill) it stays the GEMV (batch invariance, the default); opted out, it is
    # oneDNN's GEMM on the same weight
    x9 = torch.randn(GEMV_MAX_ROWS + 1, w.shape[1]).bfloat16()
    assert torch.equal(k(x9), kernels.bf16_gemv(x9, w))
    ops.set_batch_invariant(False)
    try:
        assert torch.equal(k(x9), F.linear(x9, w))
    finally:
        ops.set_batch_invariant(None)


def test_custom_ops_trace_under_dynamo():
    """The fake implementations let dynamo trace the ops into one graph (no break); values equal eager."""
    packed = pack_gguf_blocks("Q8_0", random_blocks("Q8_0", 48, 64), (48, 64))
    w = torch.randn(40, 48).bfloat16()

    def step(x):
        return kernels.bf16_gemv(kernels.gguf_gemv(x, packed), w)

    x = torch.randn(2, 64).bfloat16()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), step(x))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_equals_reference_and_is_row_independent(x_dtype, out_dtype):
    """Tolerance: the reference's roundings with another fp32 sum order and 1/sqrt for rsqrt, so fp32 outputs
    within 4 units in the last place, bf16 outputs within one."""
    from exllamav2 import ops
    from exllamav2.ops.torch_ref.norm import rms_norm as reference
    g = torch.Generator().manual_seed(7)
    for shape in ((1, 1, 576), (3, 5, 100), (17, 7)):
        x = (torch.randn(*shape, generator=g) * 4).to(x_dtype)
        for w_dtype in (torch.float32, torch.bfloat16):
            w = (torch.randn(shape[-1], generator=g) * 0.1 + 1).to(w_dtype)
            ref = reference(x, w, 1e-6, out_dtype)
            got = torch.ops.exllamav2_cpu.rms_norm(x, w, 1e-6, out_dtype)
            units = 4 if out_dtype == torch.float32 else 1
            tol = units * torch.finfo(out_dtype).eps * ref.float().abs() + torch.finfo(out_dtype).tiny
            assert got.dtype == out_dtype and ((got.float() - ref.float()).abs() <= tol).all()
            rows = x.reshape(-1, shape[-1])
            alone = torch.ops.exllamav2_cpu.rms_norm(rows[-1:], w, 1e-6, out_dtype)
            assert torch.equal(alone[0], got.reshape(-1, shape[-1])[-1])
    with ops.use_backend("cpu"):
        assert ops.rms_norm.choose(x, w, 1e-6, out_dtype).fn.__module__ == "exllamav2.ops.cpu.small_ops"
    with pytest.raises(RuntimeError, match="weight must hold 7 values"):
        torch.ops.exllamav2_cpu.rms_norm(torch.randn(2, 7), torch.randn(8), 1e-6, torch.float32)


def rms_norm_contract(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """csrc/small_ops.cpp's RMSNorm order in numpy float32: 8 partial sums (column j into sum j % 8, a ragged tail
    into sum 0), combined ((0+4)+(1+5))+((2+6)+(3+7)), 1/sqrt(mean + eps), then the reference's roundings."""
    f32 = np.float32
    xs = x.float().reshape(-1, x.shape[-1]).numpy()
    n, full = xs.shape[1], xs.shape[1] // 8 * 8
    fp32_scale = w.dtype == torch.float32 or out_dtype == torch.float32
    rows = []
    for xr in xs:
        part = np.zeros(8, f32)
        for i in range(0, full, 8):
            part = part + xr[i:i + 8] * xr[i:i + 8]
        for v in xr[full:]:
            part[0] = part[0] + v * v
        ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]))
        inv = f32(1) / np.sqrt(ss / f32(n) + f32(eps))
        rows.append(torch.from_numpy(xr * inv))
    v = torch.stack(rows)
    if fp32_scale:
        return (v * w.float()).to(out_dtype).reshape(x.shape)
    return (v.to(out_dtype).float() * w.to(out_dtype).float()).to(out_dtype).reshape(x.shape)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_follows_its_scalar_contract_bit_for_bit(x_dtype, w_dtype, out_dtype):
    """The AVX2 rows (fp32/bf16) compute exactly the scalar loop's sums and roundings: equal bits to the contract
    above, ragged column counts included, and NaN rows stay NaN."""
    g = torch.Generator().manual_seed(11)
    for n in (576, 100, 13, 8):
        x = (torch.randn(9, n, generator=g) * 3).to(x_dtype)
        w = (torch.randn(n, generator=g) * 0.1 + 1).to(w_dtype)
        got = torch.ops.exllamav2_cpu.rms_norm(x, w, 1e-5, out_dtype)
        assert torch.equal(got, rms_norm_contract(x, w, 1e-5, out_dtype)), n
    x[2, 3] = float("nan")
    got = torch.ops.exllamav2_cpu.rms_norm(x, w, 1e-5, out_dtype)
    assert got[2].isnan().all() and not got[[0, 1, 3]].isnan().any()


def test_calls_that_need_gradients_run_torch_ops_and_get_them(tmp_path):
    """The C++ kernels have no backward: a call autograd must differentiate (a steering vector trained by
    gradient, the converter's sensitivity pass) runs torch's ops, and its gradient equals the torch backend's."""
    from test_gguf_support import write_tiny_gguf

    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ops
    path = write_tiny_gguf(str(tmp_path / "q4_0.gguf"), qtype="Q4_0", hidden=128, ffn=256, vocab=96)
    model = ExLlamaV2(ExLlamaV2Config(path))
    model.load()
    mlp = model.modules[2]
    x0 = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    grads = {}
    for backend in ("torch", "cpu"):
        with ops.use_backend(backend):
            x = x0.clone().requires_grad_(True)
            y = mlp.forward(x)
            y.float().square().sum().backward()
            assert x.grad is not None and x.grad.abs().sum() > 0
            grads[backend] = x.grad.float()
    ref = grads["torch"]
    assert (grads["cpu"] - ref).norm() <= 2e-2 * ref.norm()
    # rms_norm alone, the weight requiring grad too
    w = torch.rand(128).requires_grad_(True)
    x = torch.randn(4, 128).requires_grad_(True)
    with ops.use_backend("cpu"):
        ops.rms_norm(x, w, 1e-5, torch.float32).sum().backward()
    assert x.grad is not None and w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_kernel_equals_reference_bit_for_bit(dtype, interleaved):
    """The reference's roundings step by step (csrc/small_ops.cpp), so equal to the bit; x as the strided q/k view
    of a fused qkv output, a partial rotary dimension, per-row and broadcast tables."""
    from exllamav2 import ops
    from exllamav2.ops.torch_ref.rope import rope as reference
    g = torch.Generator().manual_seed(3)
    b, s, heads, d = 3, 5, 6, 64
    fused = (torch.randn(b, s, heads * d + 40, generator=g) * 3).to(dtype)
    x = fused[..., :heads * d].view(b, s, heads, d)
    for rd, tb in ((64, b), (32, 1)):
        ang = torch.randn(tb, s, 1, rd, generator=g) * 4
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        ref = reference(x, cos, sin, interleaved)
        got = torch.ops.exllamav2_cpu.rope(x, cos, sin, interleaved)
        assert got.dtype == dtype and torch.equal(got, ref)
        with ops.use_backend("cpu"):
            assert torch.equal(ops.rope(x, cos, sin, interleaved), ref)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        torch.ops.exllamav2_cpu.rope(x, cos[:, :2], sin[:, :2], interleaved)


def test_fused_parts_of_different_types_run_each_type_through_its_kernel(tmp_path):
    """A Q4_K_M-style fusion (q/k in Q4_K beside v in Q6_K) on the cpu backend: one packed run per type
    (GgufRowRuns), the fused output the parts' own outputs side by side bit for bit, bias included, and no dense
    copy."""
    from exllamav2 import ops
    from exllamav2.gguf import GGUFFile
    from exllamav2.ops.cpu.gemv_linear import GgufGemvKernel
    from exllamav2.ops.cpu.gguf_pack import GgufRowRuns
    from exllamav2.quant.gguf import GgufWeight
    from test_gguf_support import write_tiny_gguf

    def part(t, p):
        src = GGUFFile(write_tiny_gguf(str(tmp_path / f"{t}.gguf"), qtype=t, hidden=256, heads=4, kv_heads=2,
                                       ffn=256, layers=1, seed=len(t)))
        name = f"model.layers.0.self_attn.{p}_proj.weight"
        rows = src.shape(name)[0]
        return GgufWeight(p, [(src, name, rows)], 256, rows, torch.bfloat16, "cpu", fast_path=False)

    parts = [part("Q4_K", "q"), part("Q4_K", "k"), part("Q6_K", "v")]
    bias = torch.randn(512, generator=torch.Generator().manual_seed(2))
    fused = GgufWeight.concat("qkv", parts, torch.bfloat16, "cpu")
    fused.bias = bias.bfloat16()
    with ops.use_backend("cpu"):
        k = ops.prepare_linear(None, None, fused, "cpu", torch.bfloat16)
        own = [ops.prepare_linear(None, None, p, "cpu", torch.bfloat16) for p in parts]
    assert isinstance(k, GgufGemvKernel) and isinstance(k.packed, GgufRowRuns)
    assert [r.ggml_type for r in k.packed.runs] == ["Q4_K", "Q6_K"] and fused._dense is None
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = k(x)
    want = torch.cat([o(x) for o in own], dim=1)
    # the fused call adds the bias in fp32 before its one rounding, as the parts' own kernel would with it
    with_bias = torch.cat([kernels.gguf_gemv(x, r, b.bfloat16(), 2) for r, b in
                           zip(k.packed.runs, bias.split([r.out_features for r in k.packed.runs]))], dim=1)
    assert torch.equal(y, with_bias)
    assert (y.float() - bias.bfloat16().float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                   "Q6_K", "IQ4_XS"])
def test_native_packer_writes_the_reference_packers_bytes(qtype):
    """csrc/gguf_pack.cpp (what a load uses) against gguf_pack.py's numpy packer, byte for byte: records, padding
    rows (packed from zero bytes: Q8_0's codes read 0x80 there) and super-block scales."""
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY
    per = BLOCK_GEOMETRY[qtype][0]
    for n, k in ((37, 2 * max(per, 64)), (16, per), (130, 3 * max(per, 128))):
        raw = random_raw(qtype, n, k, seed=n + k)
        raw.setflags(write=False)   # as a file's memory map is
        native = pack_gguf_blocks(qtype, raw, (n, k))
        ref = pack_gguf_blocks(qtype, raw, (n, k), native=False)
        assert torch.equal(native.qweight, ref.qweight), (n, k)
        assert (native.super_scales is None) == (ref.super_scales is None)
        if ref.super_scales is not None:
            assert native.super_scales.shape == ref.super_scales.shape
            assert torch.equal(native.super_scales.view(torch.int16), ref.super_scales.view(torch.int16))
    with pytest.raises(ValueError, match=f"w: {qtype} data has shape"):
        pack_gguf_blocks(qtype, raw[:, :-1], (n, k), name="w")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                   "Q6_K", "IQ4_XS"] + LATTICE)
def test_row_lookup_equals_gguf_py_rows(qtype):
    """csrc/gguf_rows.cpp (the token embedding's lookup over the file's blocks) against gguf-py's dequantisation of
    the same rows, cast once: equal bits in fp32, bf16 and fp16, for ids of any shape with repeats; ids out of
    range fail naming the range."""
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY
    from exllamav2.quant.gguf_embedding import host_rows
    from gguf import GGMLQuantizationType
    k = 2 * max(BLOCK_GEOMETRY[qtype][0], 64)
    raw = torch.from_numpy(random_raw(qtype, 53, k, seed=k + len(qtype)))
    ids = torch.tensor([[0, 52, 17, 17], [3, 40, 2, 51]])
    code = int(GGMLQuantizationType[qtype])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = kernels.gguf_rows(raw, ids, qtype, k, dtype, kernels.lattice_grid(qtype))
        want = host_rows(raw, ids, code, k, dtype)
        assert got.shape == (2, 4, k) and got.dtype == dtype and torch.equal(got, want), dtype
    one = kernels.gguf_rows(raw, torch.tensor([5]), qtype, k, torch.float32, kernels.lattice_grid(qtype))
    assert torch.equal(one[0], host_rows(raw, torch.tensor(5), code, k, torch.float32))
    with pytest.raises(IndexError, match="token id 53 is out of range for the embedding's 53 rows"):
        kernels.gguf_rows(raw, torch.tensor([1, 53]), qtype, k, torch.float32, kernels.lattice_grid(qtype))
    torch.library.opcheck(torch.ops.exllamav2_cpu.gguf_rows.default,
                          (raw, ids, kernels.GGUF_KINDS[qtype], k, torch.bfloat16, kernels.lattice_grid(qtype)))


def test_lattice_grids_and_their_packing():
    """The lattice types' grids as indices (kernels.lattice_grid) give gguf-py's grid values; the packing ops refuse
    a lattice kind without its grid, and the numpy packer (no grids) refuses them naming the tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits
    for qtype in LATTICE:
        cls = _type_traits[GGMLQuantizationType[qtype]]
        cls.init_grid()
        grid = kernels.lattice_grid(qtype)
        values = np.asarray(cls.grid_map, dtype=np.float32)[grid.numpy()]
        assert grid.dtype == torch.uint8 and np.array_equal(values, cls.grid.reshape(cls.grid_shape)), qtype
    raw = random_raw("IQ3_XXS", 16, 256)
    with pytest.raises(RuntimeError, match=r"kind 15 needs its grid as contiguous uint8 \(256, 4\)"):
        torch.ops.exllamav2_cpu.gguf_pack(torch.from_numpy(raw), kernels.GGUF_KINDS["IQ3_XXS"], 16, 256)
    with pytest.raises(RuntimeError, match="needs its grid"):
        torch.ops.exllamav2_cpu.gguf_rows(torch.from_numpy(raw), torch.tensor([0]), kernels.GGUF_KINDS["IQ3_XXS"], 256,
                                          torch.float32, kernels.lattice_grid("IQ2_XXS"))
    with pytest.raises(ValueError, match="blk.0.w: GGUF IQ3_XXS is packed by the C\\+\\+ kernels only"):
        pack_gguf_blocks("IQ3_XXS", raw, (16, 256), name="blk.0.w", native=False)
