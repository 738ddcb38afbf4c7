"""`ops.set_cpu_activations("int8")`: the GGUF kernels (exllamav2/ops/cpu/csrc/gguf_gemv_kernels.h) with one int8
activation stage, llama.cpp's q8_0 activations, against a reference that quantises x the same way (per 32 columns:
d = amax/127, q = round-half-even(x * (1/d)), all in fp32) and sums in fp64; and the mode through a model.

Tolerances, and why:
- kernel against that reference: relative 2e-6 of the largest output. The activations and weights are then the same
  numbers on both sides; what is left is the kernel's fp32 sum over blocks.
- every row of a call bit-identical to that row alone, AVX2 to AVX-512, 1 and 2 threads (as the default mode).
- the model's logits in int8 mode: within 3% of the logit span of the default mode's (the int8 rounding, ~0.5% per
  dot product, compounded over layers; tiny random models amplify it more than trained ones), and different from
  them (the mode is really in effect).
"""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels

if not kernels.ready():
    pytest.skip("the CPU kernels cannot be built here (see the line above)", allow_module_level=True)

from exllamav2.ops.cpu.gguf_pack import pack_gguf_blocks  # noqa: E402
from exllamav2.quant.gguf_blocks import decode_blocks, dequantize_digits  # noqa: E402
from test_cpu_kernels import random_blocks, random_raw  # noqa: E402


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's q8_0 sees it, in fp64: per 32 columns d * round(x / d), d = amax / 127 (fp32 steps)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv)
    return (d.double() * q.double()).reshape(x.shape)


def weights(qtype: str, n: int, k: int):
    if qtype not in ("Q4_0", "Q4_1", "Q8_0"):
        from gguf import GGMLQuantizationType, quants
        raw = random_raw(qtype, n, k, seed=n)
        w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qtype]).copy()).reshape(n, k)
    else:
        raw = random_blocks(qtype, n, k, seed=n + k)
        w = dequantize_digits(decode_blocks(qtype, raw, (n, k)))
    return pack_gguf_blocks(qtype, raw, (n, k)), w


@pytest.fixture(autouse=True)
def restore():
    isa, threads = kernels.isa(), torch.get_num_threads()
    yield
    kernels.set_isa(isa)
    torch.set_num_threads(threads)
    ops.set_cpu_activations("int16")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q2_K", "Q3_K",
                                   "IQ4_NL", "IQ4_XS"])
def test_one_stage_gemv_is_the_int8_quantised_product(qtype):
    n, k = 100, 512
    packed, w = weights(qtype, n, k)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, k, generator=g) * torch.rand(1, k, generator=g) * 4
    x[3] = 0.0                       # a zero row: d = 0, no division by zero
    ref = int8_activations(x) @ w.double().t()
    exact = x.double() @ w.double().t()
    results = {}
    for isa in ("avx512", "avx2") if kernels.isa() == "avx512" else (kernels.isa(),):
        kernels.set_isa(isa)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = kernels.gguf_gemv(x, packed, None, 1)
            assert (got.double() - ref).abs().max() <= 2e-6 * ref.abs().max(), (isa, threads)
            for rows in (1, 4, 8, 9, 21):
                assert torch.equal(kernels.gguf_gemv(x[rows - 1:rows], packed, None, 1), got[rows - 1:rows])
                assert torch.equal(kernels.gguf_gemv(x[:rows], packed, None, 1), got[:rows])
            results[isa, threads] = got
    first = next(iter(results.values()))
    assert all(torch.equal(r, first) for r in results.values())
    # the two stages are the more precise: the int8 mode really is another computation
    two = kernels.gguf_gemv(x, packed, None, 2).double()
    assert (two - exact).norm() * 20 < (first.double() - exact).norm()


def test_activation_stages_and_mode_names_are_checked():
    packed, _ = weights("Q4_0", 16, 64)
    with pytest.raises(RuntimeError, match="act_stages must be 1"):
        torch.ops.exllamav2_cpu.gguf_gemv(torch.randn(1, 64), packed.qweight, 0, 16, None, None, 3)
    with pytest.raises(ValueError, match="expected int16 .* or int8"):
        ops.set_cpu_activations("int4")
    assert ops.cpu_activations() == "int16"
    ops.set_cpu_activations("int8")
    assert ops.cpu_activations() == "int8"


def test_env_var_sets_the_mode_at_start_up():
    import subprocess
    import sys
    code = "from exllamav2 import ops; print(ops.cpu_activations())"
    env = {**__import__("os").environ, "EXLLAMAV2_CPU_ACTIVATIONS": "int8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "int8", out.stderr
    env["EXLLAMAV2_CPU_ACTIVATIONS"] = "fp8"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "EXLLAMAV2_CPU_ACTIVATIONS: CPU activations 'fp8' are unknown" in bad.stderr


def test_a_gguf_model_in_int8_mode(tmp_path):
    """The mode through a model's linears: logits near the default's but not equal, a row's logits the same alone
    and batched, and switching back gives the default's bits again."""
    from test_cpu_kernels_compile import tiny_model
    model = tiny_model("Q4_0", tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    default = model.forward(ids)
    ops.set_cpu_activations("int8")
    fast = model.forward(ids)
    alone = model.forward(ids[1:2])
    ops.set_cpu_activations("int16")
    again = model.forward(ids)
    span = default.max() - default.min()
    assert not torch.equal(fast, default)
    assert (fast - default).abs().max() < 0.03 * span
    assert torch.equal(alone, fast[1:2])
    assert torch.equal(again, default)


@pytest.mark.slow
def test_compiled_decode_follows_the_mode(tmp_path):
    """`pytest -m slow`: the compiled step (direct frames included, runtime/guards.py) recompiles when the mode
    changes and gives the eager step's logits in each mode."""
    from exllamav2 import ExLlamaV2Cache
    from test_cpu_kernels_compile import teacher_forced, tiny_model
    model = tiny_model("Q4_0", tmp_path)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(3, 96, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = ExLlamaV2Cache(model, max_seq_len=128)
    eager = {}
    for mode in ("int16", "int8"):
        ops.set_cpu_activations(mode)
        eager[mode] = teacher_forced(model, ids, tokens, cache)
    assert not torch.equal(eager["int16"], eager["int8"])
    from torch._dynamo.utils import counters
    runner = model.compile_decode(max_seq_len=128, progress=False)
    try:
        for i, mode in enumerate(("int16", "int8", "int16", "int8")):
            ops.set_cpu_activations(mode)
            graphs = counters["stats"]["unique_graphs"]
            got = teacher_forced(model, ids, tokens, cache)
            if i >= 2:  # each mode's graphs are kept: switching back compiles nothing
                assert counters["stats"]["unique_graphs"] == graphs, mode
            span = eager[mode].abs().max()
            assert (got - eager[mode]).abs().max() <= 0.02 * span, mode
            other = eager["int8" if mode == "int16" else "int16"]
            assert (got - eager[mode]).abs().max() < (got - other).abs().max(), mode
        assert runner.trusted.direct > 0
    finally:
        model.decode_runner = None
