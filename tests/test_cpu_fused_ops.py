"""The fused small CPU op for eager decode, RoPE plus the KV-cache write (exllamav2/ops/cpu/csrc/small_ops.cpp,
ops/cpu/small_ops.py), against its reference torch_ref/rope_kv.py (rope + index_copy_), bit for bit: the op alone
in every dtype, and a tiny model's logits and greedy tokens with the op against the same model with the reference
registered in its place (everything else, the GEMVs and the norm included, the same).
"""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels, small_ops
from exllamav2.ops.torch_ref import rope_kv as rope_kv_ref

if not kernels.ready():
    pytest.skip("the CPU kernels cannot be built here (see the line above)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cpu_only(*args, **kwargs):
    return None if args[0].device.type == "cpu" else "not on the CPU"


@pytest.fixture
def restore_the_kernel():
    """The cpu backend's rope_kv_write back to the kernel after a test that registers the reference in its place."""
    yield
    ops.rope_kv_write.register("cpu", small_ops.rope_kv_write, _cpu_only)


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
    """Under torch.compile the op traces the reference (index_copy_ for the cache, inductor's own fusions)."""
    qk, v, cos, sin = _rope_case(torch.float32, False, 1, 1, 4, 2, 32, 32, 1, seed=6)
    idx = torch.tensor([2])

    def step(qk, v, kc, vc):
        return ops.rope_kv_write(qk, v, cos, sin, False, kc, vc, idx, 4) * 2

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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tiny_model_logits_are_identical_with_the_fused_op(dtype, tmp_path, restore_the_kernel):
    """A prompt in a batch of 2, then 12 greedy steps: the same logits (so the same tokens) with the fused op as with
    its reference."""
    from test_gguf_support import write_tiny_gguf

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    path = write_tiny_gguf(str(tmp_path / "llama.gguf"), qtype="Q4_0", hidden=128, ffn=256, vocab=96, heads=4,
                           kv_heads=2)
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.profiler.profile() as prof:  # the kernel runs (a silent decline would compare the reference to itself)
        fused = _greedy_logits(model, cache, ids, 12)
    assert "exllamav2_cpu::rope_kv_write" in {e.name for e in prof.events()}
    ops.rope_kv_write.register("cpu", rope_kv_ref.rope_kv_write, _cpu_only)
    reference = _greedy_logits(model, cache, ids, 12)
    assert torch.isfinite(fused).all() and torch.equal(fused, reference)
