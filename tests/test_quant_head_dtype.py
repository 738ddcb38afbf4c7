"""A quantized head in a bf16 model whose residual stream is fp32 (Gemma 2/3): the final norm hands it fp32
activations, and it runs them in the model's dtype as a dense head does (exllamav2/linear.py), not through an fp32
copy of the dequantised weight (Gemma-3-270M's 262k x 640 head: 671 MB, ~5x the decode step's time)."""

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from test_gguf_support import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gemma3_q8(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "g3.gguf"), arch="gemma3", heads=2, kv_heads=1,
                           head_dim=64, layers=2, qtype="Q8_0")


def _load(path):
    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    return model


def test_quantized_head_runs_in_model_dtype(tiny_gemma3_q8):
    model = _load(tiny_gemma3_q8)
    head = model.modules[-1]
    assert head._q_handle is not None and model.archparams.residual_stream_fp32
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[3, 7, 11, 5]])
    cache = ExLlamaV2Cache(model, batch_size=1, max_seq_len=64)
    logits = model.forward(ids, cache).float()
    assert set(head._kernels) == {torch.bfloat16}, "the head prepared a kernel for fp32 activations"
    # the same logits as the head fed the final norm's output rounded to bf16 by hand
    x = model.forward(ids, ExLlamaV2Cache(model, batch_size=1, max_seq_len=64), preprocess_only=False,
                      last_id_only=False, return_last_state=True)[1]
    assert x.dtype == torch.float32
    y = head.forward(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(logits, y, rtol=0, atol=0)
