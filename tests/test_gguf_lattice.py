"""GGUF's lattice types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: grids of 4 or 8 weights per index) kept in
blocks on the CPU: packed as the GEMV's 4-bit table codes (exllamav2/ops/cpu/csrc/gguf_file_blocks.h), where they
loaded dense in bf16 before. A model of each type gives the torch backend's logits (the reference dequantises
through gguf-py), its token embedding stays in the file's blocks, and the Triton kernels (a GPU) read them
re-encoded as 4-bit table blocks."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels
from test_backends import BF16, _assert_logits_close, _load, _run
from test_gguf_support import write_tiny_gguf

LATTICE = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]


@pytest.mark.parametrize("qtype", LATTICE)
def test_lattice_model_runs_packed_and_equals_torch(qtype, tmp_path):
    from exllamav2.ops.cpu.gemv_linear import GgufGemvKernel
    from exllamav2.quant.gguf import GgufWeight
    from exllamav2.quant.gguf_embedding import GgufEmbeddingTable
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=256, ffn=512, heads=4, kv_heads=2,
                           vocab=96, seed=len(qtype))
    model = _load(path, BF16, max_input_len=8)
    layer = model.modules[1]
    assert isinstance(layer.q_proj.q_handle, GgufWeight) and layer.q_proj.q_handle.types == [qtype]
    assert isinstance(model.modules[0].table, GgufEmbeddingTable) and model.modules[0].embedding is None
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    # the oracle: the torch backend in fp32 (gguf-py's weights, exact); the torch backend in bf16 rounds each weight
    # to bf16, which on these random models moves the logits about as much as bf16 activations do (2-3%)
    exact = _run(_load(path, torch.float32, max_input_len=8), ids, 10, "torch")
    ref = _run(model, ids, 10, "torch").float()
    got = _run(model, ids, 10, None).float()

    def err(a):
        return ((a - exact).norm() / exact.norm()).item()
    assert err(got) < 0.05 and err(got) <= 1.25 * err(ref) + 0.005, (err(got), err(ref))
    _assert_logits_close(got, exact, rel=0.08)
    if kernels.ready():
        k = layer.qkv.kernel(BF16)
        assert isinstance(k, GgufGemvKernel) and k.packed.ggml_type == qtype
        assert layer.q_proj.q_handle._dense is None   # nothing dense kept beside the packed copy


def test_lattice_types_reach_the_gpu_path_re_encoded(tmp_path, monkeypatch):
    """Off the CPU a lattice type stays in blocks where the CPU kernels can re-encode it (lattice_on_device): the
    Triton GGUF linear (interpreter, on CPU tensors) then reads 4-bit table blocks of 146 bytes per 256 weights,
    and its output equals the torch backend's dequantise-then-matmul."""
    pytest.importorskip("triton")
    from exllamav2.gguf import GGUFFile
    from exllamav2.quant.gguf import GgufWeight, gguf_block_type, lattice_on_device
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), qtype="IQ3_S", hidden=256, ffn=512, vocab=96)
    src = GGUFFile(path)
    name = "model.layers.0.mlp.up_proj.weight"
    assert gguf_block_type(src, name, "cpu") == "IQ3_S"
    assert gguf_block_type(src, name, "cuda") == ("IQ3_S" if lattice_on_device() else None)
    if not kernels.ready():
        pytest.skip("the re-encoding for the Triton kernels is done by the CPU kernels, which cannot build here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n, k = src.shape(name)
    q = GgufWeight("up", [(src, name, n)], k, n, torch.float16, "cpu")
    with ops.use_backend("triton"):
        fast = ops.prepare_linear(None, None, q, "cpu", torch.float16)
    with ops.use_backend("torch"):
        ref = ops.prepare_linear(None, None, q, "cpu", torch.float16)
    assert fast.backend == "triton" and fast.row_bytes == k // 256 * 146 and fast.qcode == 14
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0)).half()
    got, want = fast(x).float(), ref(x).float()
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()


# the 4-bit table blocks' decoding (exllamav2/ops/triton/gguf_kernels.py: _decode_lut4): magnitudes, output shift
_LUT = {"IQ2_XXS": ((8, 25, 43), 3), "IQ2_XS": ((8, 25, 43), 3), "IQ2_S": ((8, 25, 43), 3),
        "IQ3_XXS": ((4, 12, 20, 28, 36, 44, 52, 62), 2), "IQ3_S": ((1, 3, 5, 7, 9, 11, 13, 15), 0),
        "IQ1_S": ((1, 7, 9), 3), "IQ1_M": ((1, 7, 9), 3)}


@pytest.mark.parametrize("qtype", LATTICE)
def test_lattice_edge_blocks_equal_gguf_py_bit_for_bit(qtype):
    """What random codes with realistic d do not reach: d of +-0, fp16 subnormals, +-65504, +-inf and NaN, and
    blocks of all-zero and all-one bytes (every scale nibble 15, every grid index its maximum, every delta and sign
    bit set). The row lookup, the packed layout's dequantisation and the 4-bit table blocks the Triton kernels read
    (decoded here as _decode_lut4 does) all give gguf-py's fp32 bits (NaN where it has NaN)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from exllamav2.ops.cpu.gguf_pack import pack_gguf_blocks
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY, set_block_d
    if not kernels.ready():
        pytest.skip("the CPU kernels cannot be built here")
    per, bb = BLOCK_GEOMETRY[qtype]
    n, k = 48, 512
    d_values = np.array([0.0, -0.0, 2 ** -24, -2 ** -24, 2 ** -14 - 2 ** -24, 6.1e-5, 1.0, -0.37, 65504, -65504,
                         np.inf, -np.inf, np.nan], dtype=np.float16)
    g = np.random.default_rng(len(qtype))
    raw = g.integers(0, 256, (n, k // per, bb), dtype=np.uint8)
    raw[:16], raw[16:32] = 0, 255
    set_block_d(qtype, raw, d_values[g.integers(0, len(d_values), (n, k // per))])
    raw = raw.reshape(n, -1)
    want = dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32)

    def same_bits(got):
        got = np.ascontiguousarray(got, dtype=np.float32)
        nan = np.isnan(want)
        return np.array_equal(np.isnan(got), nan) and np.array_equal(got.view(np.uint32)[~nan],
                                                                     want.view(np.uint32)[~nan])
    grid = kernels.lattice_grid(qtype)
    assert same_bits(kernels.gguf_rows(torch.from_numpy(raw), torch.arange(n), qtype, k, torch.float32, grid))
    assert same_bits(kernels.gguf_dequant(pack_gguf_blocks(qtype, raw, (n, k)), torch.float32))
    lut = kernels.lut_blocks(qtype, torch.from_numpy(raw)).numpy().reshape(n, k // 256, 146)
    mags, shift = _LUT[qtype]
    table = np.zeros(16, np.float32)
    table[8:8 + len(mags)], table[8 - len(mags):8] = mags, [-m for m in reversed(mags)]
    d = lut[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = lut[..., 18:].reshape(n, k // 256, 8, 16)
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k // 256, 256)
    j = np.arange(256)
    w = (d[..., None] * lut[..., 2 + j // 16].astype(np.float32)) * table[codes] * np.float32(2.0 ** -shift)
    assert same_bits(w.reshape(n, k))
