"""The fused small CPU ops for eager decode (exllamav2/ops/cpu/csrc/small_ops.cpp, ops/cpu/small_ops.py) against
their references, bit for bit:
- gated_activation: act(gate) * up for silu, gelu (erf) and gelu (tanh) in fp32/bf16/fp16, against
  torch_ref/activation.py (torch's own kernels): gate and up as the strided halves of a fused output, contiguous,
  one row or many, lengths with and without a remainder past the last pair of vectors;
- rope_kv_write: RoPE on a fused q|k plus the k/v cache write, against torch_ref/rope_kv.py (rope + index_copy_);
- a tiny model's logits and greedy tokens with the fused ops against the same model with their references
  registered in their place (everything else, the GEMVs and the norm included, the same).
"""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels, small_ops
from exllamav2.ops.torch_ref import activation as act_ref
from exllamav2.ops.torch_ref import rope_kv as rope_kv_ref

if not kernels.ready():
    pytest.skip("the CPU kernels cannot be built here (see the line above)", allow_module_level=True)

TORCH_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = ["silu", "gelu", "gelu_pytorch_tanh"]


def _cpu_only(*args, **kwargs):
    return None if args[0].device.type == "cpu" else "not on the CPU"


@pytest.fixture
def references_in_place():
    """Registers the references as the cpu backend's gated_activation and rope_kv_write for the test's block."""
    def use(reference: bool):
        ops.gated_activation.register("cpu", act_ref.gated_activation if reference else small_ops.gated_activation,
                                      _cpu_only)
        ops.rope_kv_write.register("cpu", rope_kv_ref.rope_kv_write if reference else small_ops.rope_kv_write,
                                   _cpu_only)
    yield use
    use(False)


def _gate_up(shape, dtype, seed, layout):
    """gate and up of `shape`: the halves of one fused (..., 2n) output, or two contiguous tensors."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4).to(dtype)
    gate, up = y.split(shape[-1], dim=-1)
    return (gate, up) if layout == "fused" else (gate.contiguous(), up.contiguous())


@pytest.mark.skipif(not TORCH_AVX512, reason="the kernel reproduces torch's AVX-512 activation kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["fused", "contiguous"])
def test_gated_activation_is_bit_identical_to_the_reference(dtype, act, layout):
    # decode rows, several rows, remainders past the vector pairs (31, 77, 100), and sizes above the serial limit
    for i, shape in enumerate(((1, 1, 1536), (3, 100), (1, 77), (2, 5, 64), (4, 4, 31), (2, 8192))):
        gate, up = _gate_up(shape, dtype, seed=i, layout=layout)
        want = act_ref.gated_activation(gate, up, act)
        got = torch.ops.exllamav2_cpu.gated_activation(gate, up, small_ops.GATED_ACTS[act])
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want), (shape, (got != want).sum())
        with ops.use_backend("cpu"):
            assert torch.equal(ops.gated_activation(gate, up, act), want)
    with ops.use_backend("cpu"):
        assert ops.gated_activation.choose(gate, up, act).fn is small_ops.gated_activation


@pytest.mark.skipif(not TORCH_AVX512, reason="the kernel reproduces torch's AVX-512 activation kernels")
def test_gated_activation_remainder_uses_libm_like_torch():
    """fp32 silu: torch's vector loop (SLEEF) and its element-by-element remainder (libm) round differently for
    some inputs; the kernel matches both, so the same value gives different bits at different places in a row."""
    x = torch.linspace(-12, 12, 4001)
    vec_part = torch.nn.functional.silu(x)  # 4001 = 125 * 32 + 1: all but the last through the vector loop
    scalar_part = torch.cat([torch.nn.functional.silu(x[i:i + 1]) for i in range(x.numel())])
    assert not torch.equal(vec_part, scalar_part)  # the premise: the two paths differ somewhere
    one = torch.ones(1)
    got_scalar = torch.cat([torch.ops.exllamav2_cpu.gated_activation(x[i:i + 1], one, 0) for i in range(x.numel())])
    assert torch.equal(got_scalar, scalar_part)
    assert torch.equal(torch.ops.exllamav2_cpu.gated_activation(x, torch.ones_like(x), 0), vec_part)


def test_gated_activation_declines_what_it_does_not_take():
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    with ops.use_backend("cpu"):
        # an activation without a kernel, a broadcast up, mixed dtypes: the reference's result
        for a, b, act in ((gate, up, "relu"), (gate, up[:1], "silu"), (gate, up.bfloat16(), "silu"),
                          (gate.double(), up.double(), "silu")):
            assert torch.equal(ops.gated_activation(a, b, act), act_ref.gated_activation(a, b, act))
        # a call autograd must differentiate gets torch's ops and their gradient
        x = gate.clone().requires_grad_(True)
        ops.gated_activation(x, up, "silu").sum().backward()
        want = torch.sigmoid(gate) * (1 + gate * (1 - torch.sigmoid(gate))) * up
        assert torch.allclose(x.grad, want, atol=1e-6)
    with pytest.raises(RuntimeError, match="gate and up must share a shape"):
        torch.ops.exllamav2_cpu.gated_activation(gate, up[:1], 0)
    with pytest.raises(RuntimeError, match=r"act must be 0 \(silu\), 1 \(gelu\) or 2"):
        torch.ops.exllamav2_cpu.gated_activation(gate, up, 7)


def _rope_case(dtype, interleaved, b, s, hq, hkv, d, rd, table_rows, seed):
    g = torch.Generator().manual_seed(seed)
    fused = (torch.randn(b, s, (hq + 2 * hkv) * d, generator=g) * 3).to(dtype)
    qk = fused[..., :(hq + hkv) * d].view(b, s, hq + hkv, d)
    v = fused[..., (hq + hkv) * d:].view(b, s, hkv, d)
    ang = torch.randn(table_rows, s, 1, rd, generator=g) * 4
    return qk, v, ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_kv_write_is_bit_identical_to_rope_and_index_copy(dtype, interleaved):
    """q, the written cache rows and the untouched ones: equal to the bit. The cache is a row slice of a larger
    buffer (as attend passes it when the batch is smaller than the cache's)."""
    for b, s, rd, table_rows, index in ((1, 1, 64, 1, [37]), (3, 5, 32, 3, [4, 5, 6, 7, 8]), (2, 3, 64, 1, [0, 9, 2])):
        hq, hkv, d = 6, 2, 64
        qk, v, cos, sin = _rope_case(dtype, interleaved, b, s, hq, hkv, d, rd, table_rows, seed=b * 10 + s)
        idx = torch.tensor(index)
        cache0 = torch.randn(2, b + 1, 40, hkv, d).to(dtype)
        kc_ref, vc_ref = cache0[0].clone(), cache0[1].clone()
        kc, vc = cache0[0].clone(), cache0[1].clone()
        q_ref = rope_kv_ref.rope_kv_write(qk, v, cos, sin, interleaved, kc_ref[:b], vc_ref[:b], idx, hq)
        q = torch.ops.exllamav2_cpu.rope_kv_write(qk, v, cos, sin, interleaved, kc[:b], vc[:b], idx, hq)
        assert q.shape == (b, s, hq, d) and torch.equal(q, q_ref)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        assert not torch.equal(kc[:b, idx], cache0[0][:b, idx])  # something was written
        with ops.use_backend("cpu"):
            kc2, vc2 = cache0[0].clone(), cache0[1].clone()
            assert torch.equal(ops.rope_kv_write(qk, v, cos, sin, interleaved, kc2[:b], vc2[:b], idx, hq), q_ref)
            assert torch.equal(kc2, kc_ref) and torch.equal(vc2, vc_ref)
            assert ops.rope_kv_write.choose(qk, v, cos, sin, interleaved, kc2, vc2, idx, hq).fn \
                is small_ops.rope_kv_write


def test_rope_kv_write_declines_and_checks():
    qk, v, cos, sin = _rope_case(torch.float32, False, 1, 2, 4, 2, 32, 32, 1, seed=5)
    idx = torch.tensor([3, 4])
    with ops.use_backend("cpu"):
        # a cache of another dtype: the reference converts on the write
        kc, vc = torch.zeros(1, 8, 2, 32, dtype=torch.bfloat16), torch.zeros(1, 8, 2, 32, dtype=torch.bfloat16)
        kr, vr = kc.clone(), vc.clone()
        q = ops.rope_kv_write(qk, v, cos, sin, False, kc, vc, idx, 4)
        q_ref = rope_kv_ref.rope_kv_write(qk, v, cos, sin, False, kr, vr, idx, 4)
        assert torch.equal(q, q_ref) and torch.equal(kc, kr) and torch.equal(vc, vr)
    kc, vc = torch.zeros(1, 8, 2, 32), torch.zeros(1, 8, 2, 32)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 8 is outside the cache's 8 positions"):
        torch.ops.exllamav2_cpu.rope_kv_write(qk, v, cos, sin, False, kc, vc, torch.tensor([7, 8]), 4)
    with pytest.raises(RuntimeError, match="v must be"):
        torch.ops.exllamav2_cpu.rope_kv_write(qk, v[:, :, :1], cos, sin, False, kc, vc, idx, 4)
    with pytest.raises(RuntimeError, match="q_heads must be in 1..5"):
        torch.ops.exllamav2_cpu.rope_kv_write(qk, v, cos, sin, False, kc, vc, idx, 6)


def test_traced_calls_run_the_reference():
    """Under torch.compile both ops trace the reference (index_copy_ for the cache, inductor's own fusions)."""
    qk, v, cos, sin = _rope_case(torch.float32, False, 1, 1, 4, 2, 32, 32, 1, seed=6)
    idx = torch.tensor([2])

    def step(qk, v, kc, vc):
        q = ops.rope_kv_write(qk, v, cos, sin, False, kc, vc, idx, 4)
        return ops.gated_activation(q, q * 2, "silu")

    kc, vc = torch.zeros(1, 4, 2, 32), torch.zeros(1, 4, 2, 32)
    kc2, vc2 = kc.clone(), vc.clone()
    with ops.use_backend("cpu"):
        want = step(qk, v, kc, vc)
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(qk, v, kc2, vc2)
    assert torch.equal(got, want) and torch.equal(kc2, kc) and torch.equal(vc2, vc)


def _greedy_logits(model, cache, ids, steps):
    cache.current_seq_len = 0
    logits = [model.forward(ids, cache)[:, -1].float()]
    for _ in range(steps):
        logits.append(model.forward(logits[-1].argmax(-1, keepdim=True), cache)[:, -1].float())
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch, dtype", [("llama", "bfloat16"), ("llama", "float16"), ("llama", "float32"),
                                         ("gemma3", "float32")])
def test_tiny_model_logits_are_identical_with_the_fused_ops(arch, dtype, tmp_path, references_in_place):
    """A prompt in a batch of 2, then 12 greedy steps: the same logits (so the same tokens) with the fused ops as
    with their references. llama: silu and the fused q|k RoPE with the cache write; gemma3: gelu (tanh), its q/k
    norms keep RoPE apart from the write."""
    from test_gguf_support import write_tiny_gguf

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    path = write_tiny_gguf(str(tmp_path / f"{arch}.gguf"), arch, qtype="Q4_0", hidden=128, ffn=256, vocab=96,
                           heads=4, kv_heads=2, head_dim=32 if arch == "llama" else 64)
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    assert model.modules[2].act_name in small_ops.GATED_ACTS
    cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    fused = _greedy_logits(model, cache, ids, 12)
    with torch.profiler.profile() as prof:  # the kernels ran (a silent decline would compare the reference to itself)
        model.forward(ids[:, :1], cache)
    ran = {e.name for e in prof.events()}
    assert ("exllamav2_cpu::gated_activation" in ran) == TORCH_AVX512
    assert ("exllamav2_cpu::rope_kv_write" in ran) == (arch == "llama")
    references_in_place(True)
    reference = _greedy_logits(model, cache, ids, 12)
    assert torch.isfinite(fused).all() and torch.equal(fused, reference)
