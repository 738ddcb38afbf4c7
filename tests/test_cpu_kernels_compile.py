"""The compiled decode step (model.compile_decode(), runtime/decode.py) calls the C++ CPU kernels as custom ops
inside the inductor graph and gives the eager step's greedy tokens (`pytest -m slow`: one compile per model,
~1 min each on 2 cores). The fast check that dynamo traces the ops: tests/test_cpu_kernels.py."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.ops.cpu import kernels
from exllamav2.ops.cpu.gemv_linear import DenseGemvKernel, GgufGemvKernel

pytestmark = pytest.mark.skipif(not kernels.ready(), reason="the CPU kernels cannot be built here")


def greedy(model, ids, n, cache):
    cache.current_seq_len = 0
    logits = model.forward(ids, cache, last_id_only=True)[0, -1]
    tokens = []
    for _ in range(n):
        tokens.append(int(logits.float().argmax()))
        logits = model.forward(torch.tensor([[tokens[-1]]]), cache)[0, -1]
    return tokens


def teacher_forced(model, ids, tokens, cache):
    """Logits of every decode step when the given tokens are fed (so two arithmetics see the same inputs)."""
    cache.current_seq_len = 0
    model.forward(ids, cache, last_id_only=True)
    return torch.stack([model.forward(torch.tensor([[t]]), cache)[0, -1].float() for t in tokens])


def tiny_model(kind, tmp_path):
    from test_gguf_support import write_tiny_gguf
    if kind == "dense":
        from test_backends import tiny_dense
        path = tiny_dense.__wrapped__(type("F", (), {"mktemp": lambda self, n: tmp_path / n})())
    else:
        hidden = 256 if kind.startswith("IQ") else 128   # the lattice types' super-blocks are 256 wide
        path = write_tiny_gguf(str(tmp_path / f"{kind}.gguf"), qtype=kind, hidden=hidden, ffn=256, vocab=96)
    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = 128
    model = ExLlamaV2(cfg)
    model.load()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "IQ2_XS", "dense"])
def test_compiled_decode_with_the_kernels_gives_the_eager_tokens(kind, tmp_path):
    model = tiny_model(kind, tmp_path)
    want = GgufGemvKernel if kind != "dense" else DenseGemvKernel
    assert isinstance(model.modules[2].down_proj.kernel(torch.bfloat16), want)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = ExLlamaV2Cache(model, max_seq_len=128)
    tokens = greedy(model, ids, 12, cache)
    eager = teacher_forced(model, ids, tokens, cache)
    runner = model.compile_decode(max_seq_len=128, progress=False)
    try:
        assert runner.compiled
        with torch.profiler.profile() as prof:
            got = teacher_forced(model, ids, tokens, cache)
        op = "exllamav2_cpu::gguf_gemv" if kind != "dense" else "exllamav2_cpu::bf16_gemv"
        assert any(e.name == op for e in prof.events()), "the compiled step did not call the C++ kernel"
        if kind != "dense":   # the token embedding's rows from the file's blocks, in C++ (csrc/gguf_rows.cpp)
            assert any(e.name == "exllamav2_cpu::gguf_rows" for e in prof.events())
        # inductor keeps some elementwise intermediates in fp32 where eager rounds them to bf16: logits agree to
        # bf16 precision, and the greedy token is the same wherever eager's top two are not a near tie
        span = eager.abs().max()
        assert (got - eager).abs().max() <= 0.05 * span
        top2 = eager.topk(2, dim=-1).values
        near_tie = (top2[:, 0] - top2[:, 1]) < 0.02 * span
        assert ((got.argmax(-1) == eager.argmax(-1)) | near_tie).all()
        assert (got.argmax(-1) == eager.argmax(-1)).sum() >= len(tokens) - 2
    finally:
        model.decode_runner = None
