"""The op layer (exllamav2/ops): the choice between backends, and every backend held equal to `torch`, per op
and end to end (dense bf16, GGUF Q4_0/Q4_1/Q8_0 blocks, EXL2, GPTQ; padded batches, chunked prefill, a cache
shared across calls).

Tolerances: ops that run the same arithmetic are compared exactly. The packed int4 kernel rounds each group's
scale and zero to bf16 and accumulates in its own order, so a linear agrees with dequantise-then-matmul to 1% of
the output's norm; a whole tiny model's logits agree to 3% of their largest magnitude, with the same argmax
wherever the reference's top two logits are not within that margin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops
from exllamav2.ops import NoBackendError, dispatch
from exllamav2.quant import gptq_quantize, make_quant_weight
from exllamav2.quant.exl2 import exl2_pack
from test_gguf_support import write_tiny_gguf

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _auto_backend():
    ops.set_backend(None)
    yield
    ops.set_backend(None)


# ---------------------------------------------------------------------------------------------- dispatch

def test_pinning_and_the_error_that_names_op_and_reasons():
    x = torch.randn(2, 8)
    w = torch.ones(8)
    with ops.use_backend("triton"):
        with pytest.raises(NoBackendError) as e:
            ops.rms_norm(x, w, 1e-6, x.dtype)
    msg = str(e.value)
    assert "rms_norm" in msg and "triton" in msg and "pinned" in msg
    with ops.use_backend("cpu"):
        assert ops.rms_norm.choose(x, w, 1e-6, x.dtype).backend == "cpu"
    with ops.use_backend("torch"):
        assert ops.rms_norm.choose(x, w, 1e-6, x.dtype).backend == "torch"
    assert ops.pinned_backend() is None
    with pytest.raises(ValueError, match="backend 'cuda' is unknown"):
        ops.set_backend("cuda")


def test_linear_error_names_the_layer_and_each_backend():
    # groups of 16 rows: neither the C++ GEMV (whole 32-column blocks) nor the int4 kernel (bf16 only) takes fp32
    q = make_quant_weight("blk.q_proj", gptq_quantize(torch.randn(32, 64), group_size=16), 64, 32, torch.float32,
                          "cpu", fast_path=False)
    with ops.use_backend("cpu"):
        with pytest.raises(NoBackendError) as e:
            ops.prepare_linear(None, None, q, "cpu", torch.float32, name="blk.q_proj")
    assert "blk.q_proj" in str(e.value) and "bfloat16" in str(e.value)
    # unpinned, the reference takes what the CPU kernel declines
    assert ops.prepare_linear(None, None, q, "cpu", torch.float32).backend == "torch"
    q32 = make_quant_weight("blk.q_proj", gptq_quantize(torch.randn(32, 64), group_size=32), 64, 32, torch.float32,
                            "cpu", fast_path=False)
    assert ops.prepare_linear(None, None, q32, "cpu", BF16).backend == "cpu"


def test_environment_variable_pins_a_backend():
    code = "from exllamav2 import ops; print(ops.pinned_backend()); print(ops.dispatch.describe()['attention'])"
    env = {**os.environ, "EXLLAMAV2_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["torch", "['torch']"]
    env["EXLLAMAV2_BACKEND"] = "nonsense"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "EXLLAMAV2_BACKEND" in r.stderr and "nonsense" in r.stderr


# ---------------------------------------------------------------------------------------------- per op

def _per_op_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    w = torch.rand(64, generator=g) + 0.5
    b = torch.randn(64, generator=g)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g)
    cos, sin = torch.randn(2, 5, 1, 16, generator=g), torch.randn(2, 5, 1, 16, generator=g)
    mask = torch.rand(2, 1, 5, 9, generator=g) > 0.3
    mask[..., 0] = True
    logits = torch.randn(3, 100, generator=g)
    return [
        ("rms_norm", (x, w, 1e-6, torch.float32)),
        ("layer_norm", (x, w, b, 1e-5, torch.float32)),
        ("layer_norm", (x, w, b, 1e-5, torch.float32, True)),
        ("rope", (q.transpose(1, 2), cos, sin, False)),
        ("rope", (q.transpose(1, 2), cos[..., :8], sin[..., :8], True)),
        ("attention", (q, k, v, None, 0.25, 0.0, True)),
        ("attention", (q, k, v, mask, 0.25, 30.0, False)),
        ("attention", (q[:, :, :1], k, v, None, 0.25, 0.0, False)),
        ("activation", (x, "gelu_tanh")),
        ("gated_activation", (x, x.flip(0), "silu")),
        ("softmax_temperature", (logits, 0.7, 0.0)),
        ("top_candidates", (torch.softmax(logits, -1), 10)),
    ]


_CPU_KERNEL_OPS = ("rms_norm", "gated_activation")


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16])
def test_every_op_on_cpu_equals_torch(dtype):
    for name, args in _per_op_cases():
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        op = dispatch.get_op(name)
        with ops.use_backend("torch"):
            ref = op(*args)
        with ops.use_backend("cpu"):
            got = op(*args)
        for r, g in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
            if name == "attention":
                # the decode-row kernel (ops/cpu/csrc/attention.cpp) sums in its own fp32 order and does not round
                # the probabilities to bf16/fp16 as SDPA does; tests/test_cpu_attention.py holds it to fp64 math
                close = ((g - r).abs().max() <= 1e-5 * r.abs().max() if r.dtype == torch.float32
                         else (g.float() - r.float()).norm() <= 1e-2 * r.float().norm())
                assert g.dtype == r.dtype and close, name
            elif name in _CPU_KERNEL_OPS:
                # a C++ kernel (ops/cpu/csrc/small_ops.cpp): the reference's roundings but its own fp32 sum order
                # and 1/sqrt (RMSNorm) or exp (the gated activation), so fp32 outputs a few units in the last place
                # apart, bf16/fp16 outputs at most one
                units = 4 if r.dtype == torch.float32 else 1
                ulp = units * torch.finfo(r.dtype).eps * r.float().abs() + torch.finfo(r.dtype).tiny
                assert g.dtype == r.dtype and ((g.float() - r.float()).abs() <= ulp).all(), name
            else:
                assert torch.equal(r, g), name


# ---------------------------------------------------------------------------------------------- linear kernels

def _exl2(groups, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_in = sum(r for _, r in groups)
    codes = torch.cat([torch.randint(0, 1 << b, (r, out), generator=g) for b, r in groups])
    t = exl2_pack(codes, groups, torch.randint(0, 16, (len(groups), out), generator=g),
                  (torch.rand(len(groups), generator=g) * 0.05 + 0.01).half(), torch.randperm(n_in, generator=g),
                  torch.randn(out, generator=g))
    return make_quant_weight("exl2", t, n_in, out, BF16, "cpu", fast_path=False)


def _gptq(act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    h = None
    if act_order:
        x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
        h = x.T @ x
    t = gptq_quantize(w, group_size=64, act_order=act_order, sym=False, hessian=h)
    return make_quant_weight("gptq", t, 256, 48, BF16, "cpu", fast_path=False)


def _gguf(qtype, tmp_path):
    from exllamav2.gguf import GGUFFile
    from exllamav2.quant.gguf import GgufWeight
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=128, ffn=96)
    src = GGUFFile(path)
    name = "model.layers.0.mlp.up_proj.weight"
    n, k = src.shape(name)
    return GgufWeight("up", [(src, name, n)], k, n, BF16, "cpu")


@pytest.mark.parametrize("make", ["exl2_mixed", "exl2_4bit", "gptq", "gptq_act_order", "Q4_0", "Q4_1", "Q8_0"])
def test_packed_linear_equals_dequantise_then_matmul(make, tmp_path):
    q = {"exl2_mixed": lambda: _exl2([(8, 32), (6, 32), (5, 32), (4, 64), (3, 32), (2, 32)], 40),
         "exl2_4bit": lambda: _exl2([(4, 64)] * 3, 64),
         "gptq": lambda: _gptq(False), "gptq_act_order": lambda: _gptq(True),
         "Q4_0": lambda: _gguf("Q4_0", tmp_path), "Q4_1": lambda: _gguf("Q4_1", tmp_path),
         "Q8_0": lambda: _gguf("Q8_0", tmp_path)}[make]()
    with ops.use_backend("torch"):
        ref_k = ops.prepare_linear(None, None, q, "cpu", BF16)
    fast_k = ops.prepare_linear(None, None, q, "cpu", BF16)
    assert ref_k.backend == "torch" and fast_k.backend == "cpu"
    for rows in (1, 3, 40):
        x = torch.randn(rows, q.in_features, generator=torch.Generator().manual_seed(rows)).to(BF16)
        ref, got = ref_k(x).float(), fast_k(x).float()
        assert got.shape == ref.shape == (rows, q.out_features)
        assert (got - ref).norm() / ref.norm() < 1e-2
        # batch invariance: a row's result does not depend on the rows beside it
        assert torch.equal(fast_k(x[:1]), fast_k(x)[:1])


# ---------------------------------------------------------------------------------------------- models

def _load(path, dtype=BF16, **cfg_opts):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    cfg.max_seq_len = 128
    for k, v in cfg_opts.items():
        setattr(cfg, k, v)
    m = ExLlamaV2(cfg)
    m.load()
    return m


def _assert_logits_close(got, ref, rel=0.03):
    span = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= rel * span, ((got - ref).abs().max().item(), span)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * rel * span
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def _run(model, ids, prompt, backend, padded=False):
    """Prefill (chunked by max_input_len) then decode one token at a time; logits of every step."""
    with ops.use_backend(backend):
        cache = ExLlamaV2Cache(model, batch_size=ids.shape[0], max_seq_len=128)
        kw = {}
        if padded:
            offsets = torch.tensor([[0], [-3]])
            kw = dict(input_mask=torch.arange(ids.shape[1]).unsqueeze(0) >= (-offsets), position_offsets=offsets)
        out = [model.forward(ids[:, :prompt], cache, last_id_only=True, **kw)[:, -1]]
        for i in range(prompt, ids.shape[1]):
            out.append(model.forward(ids[:, i:i + 1], cache, **kw)[:, -1])
        return torch.stack(out, 1)


def write_tiny_llama(path, **overrides) -> str:
    """A random 2-layer Llama with q/k/v biases saved as safetensors (weights ~N(0, 0.06), norms ~N(1, 0.05))."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                attention_bias=True), **overrides})
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.06) if p.dim() > 1 else p.normal_(1.0, 0.05)
    m.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {t: write_tiny_gguf(str(d / f"{t}.gguf"), qtype=t, hidden=128, ffn=256, vocab=96, tied=(t == "Q8_0"))
            for t in ("Q4_0", "Q4_1", "Q8_0")}


def _quantized_folder(dense_dir, out, fmt):
    """The dense model's decoder linears replaced by EXL2 (random mixed-width codes) or GPTQ (RTN) tensors."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(dense_dir, out)
    sd = load_file(os.path.join(out, "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for name in [n for n in sd if ".layers." in n and n.endswith("_proj.weight")]:
        w = sd.pop(name).float()
        key = name[:-len(".weight")]
        bias = sd.pop(key + ".bias", None)
        n, k = w.shape
        if fmt == "gptq":
            t = gptq_quantize(w, group_size=32, sym=False)
            if bias is not None:
                t["bias"] = bias.half()
        else:
            groups = [(6, 32), (4, 64), (3, k - 96)]
            scale = w.abs().amax().item()
            codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=g) for b, r in groups])
            t = exl2_pack(codes, groups, torch.randint(4, 16, (len(groups), n), generator=g),
                          torch.full((len(groups),), scale / 24).half(), torch.randperm(k, generator=g), bias)
        sd.update({f"{key}.{s}": v.contiguous() for s, v in t.items()})
    save_file(sd, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    if fmt == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


@pytest.mark.parametrize("kind", ["dense", "Q4_0", "Q4_1", "Q8_0", "exl2", "gptq"])
def test_model_on_default_backends_equals_torch(kind, tiny_dense, tiny_gguf, tmp_path):
    if kind == "dense":
        path = tiny_dense
    elif kind in tiny_gguf:
        path = tiny_gguf[kind]
    else:
        path = _quantized_folder(tiny_dense, tmp_path / kind, kind)
    model = _load(path, max_input_len=8)      # a 12-token prompt is prefilled in two chunks
    ids = torch.randint(3, model.config.vocab_size, (2, 18), generator=torch.Generator().manual_seed(2))
    ref = _run(model, ids, 12, "torch")
    got = _run(model, ids, 12, None)
    _assert_logits_close(got, ref)
    if kind != "dense":
        assert model.modules[1].q_proj.is_quant()
        kernels = [model.modules[1].qkv.kernel(BF16)] if kind in tiny_gguf else [model.modules[1].q_proj.kernel(BF16)]
        assert all(k.backend == "cpu" for k in kernels)
    # padded batch (left padding on row 1)
    _assert_logits_close(_run(model, ids, 12, None, padded=True), _run(model, ids, 12, "torch", padded=True))


def test_fused_qkv_keeps_no_second_copy_and_follows_part_edits(tiny_dense):
    model = _load(tiny_dense)
    attn = model.modules[1]
    k = attn.qkv.kernel(BF16)
    fused = k.weight
    for p in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert p.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    ids = torch.randint(0, 256, (1, 6))
    before = model.forward(ids)
    # replacing a part's weight rebuilds the fused matmul from the parts on next use
    attn.v_proj.weight = torch.nn.Parameter(torch.zeros_like(attn.v_proj.weight), requires_grad=False)
    after = model.forward(ids)
    assert not torch.equal(before, after)
    assert torch.equal(attn.qkv.kernel(BF16).weight[-attn.v_proj.out_features:], attn.v_proj.weight.data)


def test_intervention_on_a_fused_part_runs_the_parts_alone(tiny_dense):
    from exllamav2.module import Intervention
    model = _load(tiny_dense, dtype=torch.float32)
    attn = model.modules[1]
    ids = torch.randint(0, 256, (1, 6))
    ref = model.forward(ids)
    seen = []
    attn.q_proj = Intervention(attn.q_proj, post_forward=lambda h, *a, **k: seen.append(h.shape) or h)
    assert not attn.qkv.runs(attn.q_proj, attn.k_proj, attn.v_proj)
    assert torch.allclose(model.forward(ids), ref, atol=1e-5) and seen
    attn.q_proj = attn.q_proj.inner
    attn.q_proj = Intervention(attn.q_proj, post_forward=lambda h, *a, **k: h * 0)
    assert not torch.allclose(model.forward(ids), ref, atol=1e-3)


def test_backends_take_turns_on_one_cache(tiny_gguf):
    """A prompt prefilled by the reference and decoded by the default backends (and back) on one cache gives the
    reference's logits: both read and write the same KV layout."""
    model = _load(tiny_gguf["Q4_1"])
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = _run(model, ids, 10, "torch")
    cache = ExLlamaV2Cache(model, max_seq_len=128)
    with ops.use_backend("torch"):
        got = [model.forward(ids[:, :10], cache, last_id_only=True)[:, -1]]
    for i in range(10, 20):
        with ops.use_backend(None if i < 15 else "torch"):
            got.append(model.forward(ids[:, i:i + 1], cache)[:, -1])
    assert cache.current_seq_len == 20
    _assert_logits_close(torch.stack(got, 1), ref)
