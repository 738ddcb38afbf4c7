"""EXL2 and GPTQ weights repacked as GGUF Q4_0/Q4_1/Q8_0 blocks for the C++ GEMV (exllamav2/ops/cpu/quant_repack.py,
gemv_linear.SegmentedGemvKernel), against the `torch` backend (F.linear on the reference dequantisation).

Tolerances, and why:
- The blocks (decoded by gguf_blocks.decode_blocks, in Python, and by the kernel's own gguf_dequant) give s * (q - z)
  exactly for EXL2, symmetric and 8-bit GPTQ: equal to the float64 product, and equal to the `torch` backend's fp16
  matrix once rounded to fp16 (the reference rounds that product to fp16 once, as the original).
- Asymmetric GPTQ (Q4_1, m = -s*z rounded to fp16): |error| <= half an fp16 ulp of s*z per weight, against the
  exact product; against the `torch` backend's fp16 matrix that plus half an fp16 ulp of the weight.
- The GEMV against x @ W_blocks.T in fp32: 1e-4 of the output's largest value, the bound of tests/test_cpu_kernels.py
  (exact weights; activations in two int8 stages per 32-column block, ~1e-5 relative; fp32 summation order).
- Against the `torch` backend: bf16 in/out relative 1e-2 in norm (as test_cpu_kernels: the outputs' bf16 rounding,
  2^-8); fp32 relative 2e-3 in norm (the torch backend's weights are rounded to fp16: 2^-11 relative each).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels

if not kernels.ready():
    pytest.skip("the CPU kernels cannot be built here (see the line above)", allow_module_level=True)

from exllamav2.ops.cpu.gemv_linear import SegmentedGemvKernel  # noqa: E402
from exllamav2.ops.cpu.quant_repack import exl2_blocks, gptq_blocks, repack_quant_weight  # noqa: E402
from exllamav2.quant import gptq_quantize, make_quant_weight  # noqa: E402
from exllamav2.quant.exl2 import exl2_codes, exl2_scales  # noqa: E402
from exllamav2.quant.gguf_blocks import decode_blocks, dequantize_digits  # noqa: E402
from exllamav2.quant.gptq import gptq_zero_points, unpack_nibble_rows  # noqa: E402
from test_quant_weight import exl2_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


def exl2_weight(groups, out, seed=0, bias=True, dtype=BF16):
    t, n_in = exl2_tensors(groups, out, seed, bias)
    return make_quant_weight("exl2", t, n_in, out, dtype, "cpu", fast_path=False)


def gptq_weight(n_in=256, out=48, group_size=64, sym=False, act_order=True, bits=4, seed=1, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.05
    h = None
    if act_order:
        x = torch.randn(2 * n_in, n_in, generator=g) * torch.linspace(0.1, 3, n_in)
        h = x.T @ x
    t = gptq_quantize(w, bits=bits, group_size=group_size, act_order=act_order, sym=sym, hessian=h)
    return make_quant_weight("gptq", t, n_in, out, dtype, "cpu", fast_path=False)


MIXED = [(8, 32), (6, 64), (5, 32), (4, 64), (3, 32), (2, 32), (2, 20)]   # every width, a last group of 20 rows


def exact_weight(q) -> torch.Tensor:
    """(out, in) float64 s * (q - z), the scales as fp16, no rounding."""
    if q.format == "exl2":
        t, lay = q.t, q.t.layout
        codes = exl2_codes(t).double()
        z = (1 << lay.row_bits).unsqueeze(1).double() / 2
        s = exl2_scales(t, torch.float16).double()[lay.row_group]
        wq = ((codes - z) * s)[:, :q.out_features]
        w = torch.empty_like(wq).index_copy_(0, t.q_perm.to(torch.int64), wq)
        return w.t()
    t = q.t
    rg = t.row_group.to(torch.int64)
    codes = unpack_nibble_rows(t.qweight, t.bits).double()
    return ((codes - gptq_zero_points(t)[rg].double()) * t.scales.double()[rg]).t()


def blocks_weight(segments, out, n_in) -> torch.Tensor:
    """(out, in) float32 from the segments' GGUF blocks, decoded in Python (gguf_blocks.py), padding dropped."""
    w = torch.zeros(out, n_in)
    for s in segments:
        ws = dequantize_digits(decode_blocks(s.ggml_type, s.raw, (out, s.gather.shape[0])))
        keep = np.ones(s.gather.shape[0], bool)
        keep[s.pad] = False
        assert (s.gather[~keep] == 0).all()
        w[:, torch.from_numpy(s.gather[keep])] += ws[:, torch.from_numpy(keep)]
    return w


def half_ulp16(v: torch.Tensor) -> torch.Tensor:
    """Half the fp16 spacing at |v| (the subnormal spacing below the normal range)."""
    a = v.abs().clamp(min=2.0 ** -14)
    return torch.exp2(torch.floor(torch.log2(a)) - 10) / 2


def test_exl2_blocks_are_the_weights_exactly():
    q = exl2_weight(MIXED, 40)
    segments = exl2_blocks(q)
    assert [s.ggml_type for s in segments] == ["Q8_0", "Q4_0"]    # widths 8/6/5, then 4/3/2
    assert [s.gather.shape[0] for s in segments] == [128, 160]    # the 20-row group padded to 32
    assert segments[1].pad.tolist() == list(range(148, 160)) and not segments[0].pad.size
    w = blocks_weight(segments, q.out_features, q.in_features)
    assert torch.equal(w.double(), exact_weight(q))
    assert torch.equal(w.half(), q.dequantize(torch.float16))     # the torch backend's fp16 matrix
    packed = repack_quant_weight(q)
    assert torch.equal(packed.dequantize(), w)                    # the kernel's own layout reads the same
    # resident bytes: the blocks at 16-row groups (40 -> 48 rows) and the gather/pad indices
    assert packed.nbytes() == 48 * (128 // 32 * 34 + 160 // 32 * 18) + 8 * (128 + 160 + 12)


def test_gptq_blocks_exact_when_symmetric_or_8_bit_and_within_half_an_ulp_of_s_z_otherwise():
    for q, kind in ((gptq_weight(sym=True), "Q4_0"), (gptq_weight(bits=8, group_size=128, sym=True), "Q8_0")):
        segments = gptq_blocks(q)
        assert [s.ggml_type for s in segments] == [kind]
        w = blocks_weight(segments, q.out_features, q.in_features)
        assert torch.equal(w.double(), exact_weight(q))
        assert torch.equal(w.half(), q.dequantize(torch.float16))
    q = gptq_weight(sym=False)
    assert [s.ggml_type for s in gptq_blocks(q)] == ["Q4_1"]
    w = blocks_weight(gptq_blocks(q), q.out_features, q.in_features).double()
    exact = exact_weight(q)
    t = q.t
    rg = t.row_group.to(torch.int64)
    sz = (t.scales.double()[rg] * gptq_zero_points(t)[rg].double()).t()
    err = (w - exact).abs()
    assert (err <= half_ulp16(sz)).all() and err.max() > 0        # rounded, and within the bound
    ref16 = q.dequantize(torch.float16).double()
    assert ((w - ref16).abs() <= half_ulp16(sz) + half_ulp16(exact)).all()
    assert torch.equal(repack_quant_weight(q).dequantize().double(), w)


def test_groups_the_blocks_cannot_hold_are_declined_or_moved_to_q8_0():
    # a GPTQ group of 48 rows (not whole 32-column blocks): declined, the int4 kernel or the torch backend runs
    q = gptq_weight(n_in=192, group_size=48, act_order=False)
    assert repack_quant_weight(q) is None
    assert not isinstance(ops.prepare_linear(None, None, q, "cpu", BF16), SegmentedGemvKernel)
    # an asymmetric group whose m = -s*z overflows fp16 goes to Q8_0 (exact); the others stay Q4_1
    t = gptq_quantize(torch.randn(32, 128) * 0.05, group_size=32, sym=False)
    t["scales"][1] = 8000.0
    q = make_quant_weight("gptq", t, 128, 32, BF16, "cpu", fast_path=False)
    segments = gptq_blocks(q)
    assert [s.ggml_type for s in segments] == ["Q4_1", "Q8_0"]
    assert segments[1].gather.tolist() == list(range(32, 64))
    w = blocks_weight(segments, 32, 128).double()
    exact = exact_weight(q)
    assert torch.equal(w[:, 32:64], exact[:, 32:64])
    # 8-bit GPTQ with codes beyond int8 after the zero (q - z < -128): declined
    t = gptq_quantize(torch.randn(32, 128) * 0.05, bits=8, group_size=64, sym=True)
    t["qzeros"][0] = -1          # every stored zero of group 0 is 255: z = 256 (v1's +1), so q - z < -128
    q = make_quant_weight("gptq", t, 128, 32, BF16, "cpu", fast_path=False)
    assert gptq_blocks(q) is None


WEIGHTS = {
    "exl2_mixed_bias": lambda dt: exl2_weight(MIXED, 40, dtype=dt),
    "exl2_4bit": lambda dt: exl2_weight([(4, 64)] * 3, 64, seed=2, bias=False, dtype=dt),
    "gptq_asym_act_order": lambda dt: gptq_weight(dtype=dt),
    "gptq_8bit": lambda dt: gptq_weight(bits=8, group_size=128, sym=True, act_order=False, dtype=dt),
}


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_gemv_equals_torch_backend_and_is_batch_invariant(name, dtype):
    q = WEIGHTS[name](dtype)
    k = ops.prepare_linear(None, None, q, "cpu", dtype)
    assert isinstance(k, SegmentedGemvKernel) and k.backend == "cpu"
    with ops.use_backend("torch"):
        ref_k = ops.prepare_linear(None, None, q, "cpu", dtype)
    w = k.packed.dequantize()
    bias = None if q.bias is None else q.bias.float()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, q.in_features, generator=g).to(dtype)
    together = k(x)
    assert together.dtype == dtype and together.shape == (17, q.out_features)
    for rows in (1, 3, 8, 17):
        xr = x[:rows]
        got = k(xr)
        assert torch.equal(got, together[:rows])                                  # batch invariant
        assert torch.equal(k(xr[rows - 1:]), together[rows - 1:rows])
        exact = xr.float() @ w.t() + (0 if bias is None else bias)
        if dtype == torch.float32:
            assert (got - exact).abs().max() <= 1e-4 * exact.abs().max(), name
        ref = ref_k(xr).float()
        rel = 1e-2 if dtype == BF16 else 2e-3
        assert (got.float() - ref).norm() <= rel * ref.norm(), (name, rows)


def test_calls_that_need_gradients_get_the_torch_backends_gradient():
    q = exl2_weight(MIXED, 40, dtype=torch.float32)
    k = ops.prepare_linear(None, None, q, "cpu", torch.float32)
    assert isinstance(k, SegmentedGemvKernel)
    with ops.use_backend("torch"):
        ref_k = ops.prepare_linear(None, None, q, "cpu", torch.float32)
    grads = []
    for kern in (k, ref_k):
        x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        kern(x).square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------- a converted model

@pytest.fixture(scope="module")
def tiny_exl2(tmp_path_factory):
    """A tiny random Llama converted to EXL2 (~5 s): widths 4 to 6 (Q4_0 and Q8_0 segments), an EXL2 head."""
    from exllamav2.conversion import ConvertSettings, convert_exl2
    from test_convert_common import make_tiny_llama
    base = tmp_path_factory.mktemp("repack")
    src = make_tiny_llama(base / "hf", layers=1)
    s = ConvertSettings(src, str(base / "exl2"), bits=4.5, head_bits=6, rows=4, length=64, sensitivity=False)
    convert_exl2(s, progress=False)
    return s.out_dir


DECODE = """
import sys, torch
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops
FORCED = [250, 17, 7, 94, 300, 3, 41, 0]
def greedy(model, backend, dtype, steps=8, forced=None):
    # greedy tokens and the logits of every step; with `forced`, those tokens are fed instead (the same inputs
    # for two backends, so their logits compare step by step even where a near-tie flips a greedy choice)
    with ops.use_backend(backend), torch.inference_mode():
        cache = ExLlamaV2Cache(model, max_seq_len=64)
        ids = torch.tensor([[0, 17, 94, 3, 250, 41, 7, 300]])
        logits = [model.forward(ids, cache, last_id_only=True)[:, -1]]
        toks = []
        for i in range(steps):
            toks.append(int(logits[-1].argmax(-1)) if forced is None else forced[i])
            logits.append(model.forward(torch.tensor([[toks[-1]]]), cache)[:, -1])
    return toks, torch.cat(logits).float()
def load(path, dtype):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    model = ExLlamaV2(cfg)
    model.load()
    return model
"""


def _decode_namespace():
    ns = {}
    exec(DECODE, ns)
    return ns


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_converted_model_on_cpu_backend_equals_torch_backend(tiny_exl2, dtype):
    ns = _decode_namespace()
    model = ns["load"](tiny_exl2, dtype)
    kinds = set()
    for m in model.modules:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            lin = getattr(m, name, None)
            if lin is not None:
                k = lin.kernel(dtype)
                assert isinstance(k, SegmentedGemvKernel), (lin.key, type(k))
                kinds.update(k.packed.kinds)
    assert isinstance(model.modules[-1].kernel(dtype), SegmentedGemvKernel)    # the EXL2 head
    assert {"Q4_0", "Q8_0"} <= kinds, kinds
    ref_toks, ref = ns["greedy"](model, "torch", dtype)
    _, logits = ns["greedy"](model, None, dtype, forced=ref_toks)
    assert_same_logits_and_clear_choices(logits, ref)


def assert_same_logits_and_clear_choices(got, ref):
    """Step by step on the same inputs: logits within 3% of the reference's span, and the same greedy choice at
    every step whose reference margin (top-1 minus top-2) is wider than twice that step's difference. A random tiny
    model has near-ties (a margin of one bf16 ulp) where any two kernels may choose differently."""
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    top2 = ref.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - ref).abs().amax(-1)
    assert clear.sum() >= 2, "no step is clear of the kernels' difference: the check would be empty"
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_without_the_cpp_kernels_the_previous_path_gives_the_same_tokens(tiny_exl2):
    """EXLLAMAV2_CPU_KERNELS=0 (a fresh interpreter: a loaded library stays loaded): bf16 runs torch's int4 kernel,
    fp32 the torch backend, and their logits on the same inputs are the GEMV path's (greedy choices too, where
    they are clear of the difference)."""
    out = tempfile.mkdtemp()
    code = DECODE + f"""
for dtype in (torch.bfloat16, torch.float32):
    model = load({tiny_exl2!r}, dtype)
    print("KERNEL", type(model.modules[1].q_proj.kernel(dtype)).__name__, model.modules[1].q_proj.kernel(dtype).backend)
    torch.save(greedy(model, None, dtype, forced=FORCED)[1], {out!r} + "/" + str(dtype) + ".pt")
"""
    env = {**os.environ, "EXLLAMAV2_CPU_KERNELS": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("KERNEL")] == ["KERNEL Int4Kernel cpu", "KERNEL DequantKernel torch"]
    ns = _decode_namespace()
    for dtype in (BF16, torch.float32):
        fallback = torch.load(os.path.join(out, str(dtype) + ".pt"))
        model = ns["load"](tiny_exl2, dtype)
        assert isinstance(model.modules[1].q_proj.kernel(dtype), SegmentedGemvKernel)
        assert_same_logits_and_clear_choices(ns["greedy"](model, None, dtype, forced=ns["FORCED"])[1], fallback)


def test_kernel_traces_into_one_graph_under_dynamo():
    """The compiled decode step (runtime/decode.py) traces the kernel: gather, zeroed padding, one custom op per
    segment and the fp32 sum, without a graph break; values equal eager."""
    for dtype in (BF16, torch.float32):
        q = exl2_weight(MIXED, 40, dtype=dtype)
        k = ops.prepare_linear(None, None, q, "cpu", dtype)
        assert len(k.segments) == 2
        x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
        compiled = torch.compile(lambda v: k(v), backend="aot_eager", fullgraph=True)
        with torch.inference_mode():
            assert torch.equal(compiled(x), k(x))
