"""A KV cache in another dtype than the activations: an fp32 Gemma 3 (whose attention runs in fp32) over a bf16
cache. Attention reads the cache back in the activations' dtype (exllamav2/attn.py); this used to stop SDPA with
"expected query, key, and value to have the same dtype". (A bf16 Gemma no longer gets there: its fp32 residual
stream's norms hand q/k/v the model's dtype, exllamav2/linear.py `cast_input`.)"""

from __future__ import annotations

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from test_gguf_support import write_tiny_gguf


def test_gemma3_fp32_activations_over_a_bf16_cache(tmp_path):
    cfg = ExLlamaV2Config(write_tiny_gguf(str(tmp_path / "g3.gguf"), "gemma3"))
    cfg.max_seq_len = 64
    cfg.dtype = torch.float32
    model = ExLlamaV2(cfg)
    model.load()
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64, dtype=dtype)
        assert cache.key_states[0].dtype == dtype
        prompt = model.forward(ids, cache)
        step = model.forward(prompt[:, -1:].argmax(-1), cache)  # a decode step reads the cache back
        runs[dtype] = torch.cat([prompt, step], 1)
        assert torch.isfinite(runs[dtype]).all()
    bf16, fp32 = runs[torch.bfloat16], runs[torch.float32]
    # the prompt's keys round to bf16 in the cache: logits agree to bf16 precision
    assert (bf16 - fp32).abs().max() <= 0.02 * fp32.abs().max()
    assert not torch.equal(bf16, fp32)  # the bf16 cache was read (its rounding shows)
