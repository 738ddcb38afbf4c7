"""GGUF's lattice types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: grids of 4 or 8 weights per index) kept in
blocks on the CPU: packed as the GEMV's 4-bit table codes (exllamav2/ops/cpu/csrc/gguf_file_blocks.h), where they
loaded dense in bf16 before. A model of each type gives the torch backend's logits (the reference dequantises
through gguf-py), its token embedding stays in the file's blocks, and on a GPU the types still load dense (no
Triton kernels for their grids)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Config, ops
from exllamav2.ops.cpu import kernels
from test_backends import BF16, _assert_logits_close, _run
from test_gguf_support import write_tiny_gguf

LATTICE = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]


def _load(path, dtype=BF16):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    cfg.max_seq_len = 128
    cfg.max_input_len = 8
    model = ExLlamaV2(cfg)
    model.load()
    return model


@pytest.mark.parametrize("qtype", LATTICE)
def test_lattice_model_runs_packed_and_equals_torch(qtype, tmp_path):
    from exllamav2.ops.cpu.gemv_linear import GgufGemvKernel
    from exllamav2.quant.gguf import GgufWeight
    from exllamav2.quant.gguf_embedding import GgufEmbeddingTable
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=256, ffn=512, heads=4, kv_heads=2,
                           vocab=96, seed=len(qtype))
    model = _load(path)
    layer = model.modules[1]
    assert isinstance(layer.q_proj.q_handle, GgufWeight) and layer.q_proj.q_handle.types == [qtype]
    assert isinstance(model.modules[0].table, GgufEmbeddingTable) and model.modules[0].embedding is None
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    # the oracle: the torch backend in fp32 (gguf-py's weights, exact); the torch backend in bf16 rounds each weight
    # to bf16, which on these random models moves the logits about as much as bf16 activations do (2-3%)
    exact = _run(_load(path, torch.float32), ids, 10, "torch")
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


def test_lattice_types_load_dense_off_the_cpu_and_triton_declines_them(tmp_path, monkeypatch):
    """gguf_block_type keeps a lattice type packed on the CPU only; the Triton GGUF linear (interpreter) names the
    type it has no kernel for, so a pinned triton backend falls back instead of failing."""
    pytest.importorskip("triton")
    from exllamav2.gguf import GGUFFile
    from exllamav2.quant.gguf import GgufWeight, gguf_block_type
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), qtype="IQ3_S", hidden=256, ffn=512, vocab=96)
    src = GGUFFile(path)
    name = "model.layers.0.mlp.up_proj.weight"
    assert gguf_block_type(src, name, "cpu") == "IQ3_S" and gguf_block_type(src, name, "cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from exllamav2.ops.triton import gguf_linear
    n, k = src.shape(name)
    q = GgufWeight("up", [(src, name, n)], k, n, torch.float16, "cpu")
    assert gguf_linear.prepare(q, None, torch.device("cpu"), torch.float16) == "up: no Triton kernel for GGUF IQ3_S"
