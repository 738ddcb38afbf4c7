"""The `cpu` backend against the `torch` reference on configurations the other backend tests do not use: model
dtypes and GGUF block types where the cpu backend used to have no linear kernel at all, and the C++ attention
kernel over head dims, GQA ratios, key counts past one 128-key split, softcap and windowed masks that the tiny
test models never reach.

Tolerances: fp32 logits of a whole tiny model within 1e-4 of their span (both backends dequantise GGUF blocks to
the same fp32 matrix; only the attention and norm kernels' fp32 sum order differs); attention outputs against
fp64 math as tests/test_cpu_attention.py holds them (fp32 1e-5; bf16/fp16 within the reference's own error or
2e-2 / 2e-3 of |v|)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2Cache, ops
from exllamav2.ops.torch_ref import attention as ref_attention
from test_backends import _load
from test_gguf_support import write_tiny_gguf


@pytest.fixture(autouse=True)
def _auto_backend():
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def _run(model, ids, prompt, backend):
    with ops.use_backend(backend):
        cache = ExLlamaV2Cache(model, batch_size=ids.shape[0], max_seq_len=64)
        out = [model.forward(ids[:, :prompt], cache)]
        for i in range(prompt, ids.shape[1]):
            out.append(model.forward(ids[:, i:i + 1], cache))
        return torch.cat(out, 1).float()


# ---------------------------------------------------------------------------------------------- GGUF in fp32

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_int4_types_in_fp32_pinned_to_cpu(qtype, tmp_path):
    """A GGUF model of the types torch's int4 kernel packs (Q4_0/Q4_1/Q8_0) loaded in fp32 with the cpu backend
    pinned: the backend declined every linear ("the int4 kernel takes bfloat16 activations") and the forward raised
    NoBackendError, while the other GGUF types (Q5_0, IQ4_NL, K-quants) ran dequantised. Now every GGUF type in fp32
    takes the exact dequantised matmul, the reference's own matrix."""
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=64, ffn=96, vocab=67, tied=False)
    model = _load(path, "float32")
    ids = torch.randint(3, 67, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = _run(model, ids, 6, "torch")
    got = _run(model, ids, 6, "cpu")
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    with ops.use_backend("cpu"):
        k = model.modules[1].qkv.kernel(torch.float32)
        assert k.backend == "cpu"
        # a part run alone (an intervention on q_proj unfuses it) prepares its own kernel too
        assert model.modules[1].q_proj.kernel(torch.float32).backend == "cpu"


def test_gguf_linear_op_in_fp32_and_fp16_on_cpu(tmp_path):
    """The op level: prepare_linear pinned to cpu takes a Q4_0 GgufWeight for fp32 and fp16 activations and
    equals the reference's dequantise-then-matmul."""
    from exllamav2.gguf import GGUFFile
    from exllamav2.quant.gguf import GgufWeight
    path = write_tiny_gguf(str(tmp_path / "q40.gguf"), qtype="Q4_0", hidden=64, ffn=96)
    src = GGUFFile(path)
    name = "model.layers.0.mlp.down_proj.weight"
    n, k = src.shape(name)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-2)):
        q = GgufWeight("down", [(src, name, n)], k, n, dtype, "cpu")
        with ops.use_backend("torch"):
            ref_k = ops.prepare_linear(None, None, q, "cpu", dtype)
        with ops.use_backend("cpu"):
            cpu_k = ops.prepare_linear(None, None, q, "cpu", dtype)
        assert cpu_k.backend == "cpu"
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
        ref, got = ref_k(x).float(), cpu_k(x).float()
        assert (got - ref).norm() <= tol * ref.norm()


# ---------------------------------------------------------------------------------------------- attention shapes

def _attention_case(d, hk, g, b, s, t, dtype, softcap, causal, mask_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    # the model's layout: (b, s, heads, d) transposed to (b, heads, s, d)
    q = torch.randn(b, s, hk * g, d, generator=gen).to(dtype).transpose(1, 2)
    k = (torch.randn(b, t, hk, d, generator=gen) * 2).to(dtype).transpose(1, 2)
    v = torch.randn(b, t, hk, d, generator=gen).to(dtype).transpose(1, 2)
    mask = None
    if mask_kind == "window":
        qp, kp = torch.arange(t - s, t).view(-1, 1), torch.arange(t).view(1, -1)
        mask = ((kp <= qp) & (qp - kp < 40)).view(1, 1, s, t).expand(b, 1, s, t)
    elif mask_kind == "random":
        mask = torch.rand(b, 1, s, t, generator=gen) > 0.3
        mask[..., -1] = True
    return q, k, v, mask


@pytest.mark.parametrize("d,hk,g,s,t,dtype,softcap,causal,mask_kind", [
    (80, 2, 3, 1, 300, torch.bfloat16, 0.0, False, None),          # head_dim 80, GQA 3, three splits
    (96, 1, 8, 3, 257, torch.float16, 50.0, True, None),           # MQA, a draft of 3 rows, softcap
    (112, 3, 1, 17, 145, torch.float32, 0.0, False, "window"),      # MHA, row blocks, a sliding window
    (256, 2, 5, 20, 280, torch.bfloat16, 5.0, False, "random"),     # head_dim 256, GQA 5, softcap + padding
    (48, 4, 2, 129, 129, torch.float16, 0.0, True, None),           # a prompt longer than one split
])
def test_attention_kernel_shapes_against_fp64(d, hk, g, s, t, dtype, softcap, causal, mask_kind):
    b = 2
    q, k, v, mask = _attention_case(d, hk, g, b, s, t, dtype, softcap, causal, mask_kind, seed=d + s)
    scale = d ** -0.5
    with ops.use_backend("torch"):
        ref = ops.attention(q, k, v, mask, scale, softcap, causal)
    with ops.use_backend("cpu"):
        got = ops.attention(q, k, v, mask, scale, softcap, causal)
    exact = ref_attention.attention(q.double(), k.double(), v.double(), mask, scale, softcap, causal)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err_cpu = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert err_cpu <= max(tol, 2 * err_ref), (err_cpu, err_ref)


@pytest.mark.parametrize("shape", ["b11t", "st", "1t", "11st", "bhst"])
@pytest.mark.parametrize("s", [1, 5, 20])
def test_attention_masks_the_reference_broadcasts(shape, s):
    """Bool masks that torch's SDPA (the reference) broadcasts: a key-padding mask (b, 1, 1, t), 2-D (s, t) and
    (1, t) masks, and a mask per query head. The C++ kernel checked for (b or 1, 1, s, t) exactly and raised on the
    others; now it reads the broadcastable ones as that shape and leaves per-head masks to the reference."""
    b, hq, hk, d = 2, 4, 2, 32
    t = s + 140   # past one 128-key split
    g = torch.Generator().manual_seed(s)
    dims = {"b11t": (b, 1, 1, t), "st": (s, t), "1t": (1, t), "11st": (1, 1, s, t), "bhst": (b, hq, s, t)}[shape]
    mask = torch.rand(*dims, generator=g) > 0.3
    mask[..., -1] = True
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hk, t, d, generator=g)
    v = torch.randn(b, hk, t, d, generator=g)
    for dtype, softcap in ((torch.float32, 0.0), (torch.float32, 5.0), (torch.bfloat16, 0.0)):
        qq, kk, vv = q.to(dtype), k.to(dtype), v.to(dtype)
        with ops.use_backend("torch"):
            ref = ops.attention(qq, kk, vv, mask, 0.2, softcap, False)
        with ops.use_backend("cpu"):
            got = ops.attention(qq, kk, vv, mask, 0.2, softcap, False)
        assert got.shape == ref.shape
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.float() - ref.float()).abs().max() <= tol, (dtype, softcap)
