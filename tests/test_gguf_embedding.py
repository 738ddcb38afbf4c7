"""A GGUF file's block-quantized token embedding stays in its blocks on the CPU (exllamav2/quant/gguf_embedding.py):
the looked-up rows give the dense load's logits bit for bit (both are gguf-py's fp32 values cast once), no dense
table is held, the custom op's fake agrees with it (what the compiled decode step traces), and bad ids fail
naming the range."""

from __future__ import annotations

import pytest
import torch

import exllamav2.embedding as embedding_module
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.quant.gguf_embedding import GgufEmbeddingTable
from test_gguf_support import write_tiny_gguf


def _load(path, dense: bool, monkeypatch=None, **cfg_opts):
    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = 64
    for k, v in cfg_opts.items():
        setattr(cfg, k, v)
    if dense:
        monkeypatch.setattr(embedding_module.ExLlamaV2Embedding, "_gguf_table", lambda self: None)
    model = ExLlamaV2(cfg)
    model.load()
    if dense:
        monkeypatch.undo()
    return model


@pytest.mark.parametrize("qtype,arch,hidden", [("Q8_0", "llama", 64), ("Q4_0", "gemma3", 64), ("Q5_1", "llama", 64),
                                               ("Q4_K", "llama", 256), ("Q6_K", "gemma3", 256)])
def test_block_table_gives_the_dense_tables_logits(qtype, arch, hidden, tmp_path, monkeypatch):
    kw = dict(heads=4, kv_heads=2, head_dim=64) if arch == "gemma3" else {}
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), arch, qtype=qtype, hidden=hidden, ffn=256, vocab=96, **kw)
    model = _load(path, dense=False)
    emb = model.modules[0]
    assert isinstance(emb.table, GgufEmbeddingTable) and emb.embedding is None and emb.table.qtype == qtype
    dense = _load(path, dense=True, monkeypatch=monkeypatch)
    assert dense.modules[0].table is None and dense.modules[0].embedding is not None
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    for m in (model, dense):
        m._out = m.forward(ids, ExLlamaV2Cache(m, batch_size=2, max_seq_len=64))
        m._step = m.forward(m._out[:, -1:].argmax(-1), None)
    assert torch.equal(model._out, dense._out) and torch.equal(model._step, dense._step)


def test_dense_options_and_bad_ids(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), qtype="Q8_0", vocab=96)
    assert _load(path, dense=False, gguf_dequantize=True).modules[0].table is None
    model = _load(path, dense=False)
    with pytest.raises(IndexError, match="token id 96 is out of range for the embedding's 96 rows"):
        model.forward(torch.tensor([[1, 96]]))


def test_the_op_and_its_fake_agree(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), qtype="Q4_1", vocab=96)
    table = _load(path, dense=False).modules[0].table
    ids = torch.tensor([[0, 5, 95], [7, 7, 1]])
    torch.library.opcheck(torch.ops.exllamav2.gguf_rows.default,
                          (table.blocks, ids, table.code, table.width, torch.bfloat16))
    rows = table.lookup(ids, torch.float32)
    assert rows.shape == (2, 3, 64) and torch.equal(rows[1, 0], rows[1, 1])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "IQ4_NL", "IQ2_XS", "IQ1_M"])
def test_the_device_lookup_equals_the_host_lookup(qtype, tmp_path, monkeypatch):
    """The GPU path (the file's bytes on the device, rows gathered and decoded by the Triton GGUF kernels, no host
    sync), run on CPU tensors under Triton's interpreter: the host lookup's values bit for bit, in fp16 and bf16."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from exllamav2.gguf import GGUFFile
    from exllamav2.quant.gguf_embedding import gguf_embedding_table
    hidden = 64 if qtype in ("Q8_0", "IQ4_NL") else 256
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), qtype=qtype, hidden=hidden, ffn=256, vocab=96)
    src = GGUFFile(path)
    host = gguf_embedding_table(src, "model.embed_tokens.weight")
    device = GgufEmbeddingTable("model.embed_tokens.weight", *src.raw("model.embed_tokens.weight"), triton=True)
    assert device.triton and not host.triton and device.nbytes() == device.blocks.numel()
    ids = torch.tensor([[0, 95, 17, 17], [3, 50, 2, 94]])
    for dtype in (torch.float16, torch.bfloat16):
        want = host.lookup(ids, dtype)
        got = device.lookup(ids, dtype)
        assert got.shape == (2, 4, hidden) and got.dtype == dtype and torch.equal(got, want), dtype


def test_an_eager_forward_does_not_import_dynamo(tmp_path):
    """The eager lookup calls the host function, not the custom op: an op call would import torch._dynamo on first
    use (custom_op's implementations run under torch._disable_dynamo), ~1 s on a model's first forward."""
    import subprocess
    import sys
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), qtype="Q8_0", vocab=96)
    code = ("import sys, torch\nfrom exllamav2 import ExLlamaV2, ExLlamaV2Config\n"
            f"cfg = ExLlamaV2Config({path!r}); cfg.max_seq_len = 64\n"
            "m = ExLlamaV2(cfg); m.load()\n"
            "assert m.modules[0].table is not None\n"
            "m.forward(torch.tensor([[1, 2, 3]]))\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "clean"
