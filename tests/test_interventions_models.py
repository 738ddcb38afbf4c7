"""Shared tiny models for the intervention tests: a random Llama (sequential blocks) and a random GPT-NeoX
(parallel blocks; skipped while the engine does not register GPTNeoXForCausalLM), loaded in fp32."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

ARCHS = ["llama", "gpt_neox"]


def build_tiny(arch: str, path) -> str:
    from parity import make_tiny, save_hf_model
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
        hf = make_tiny(LlamaForCausalLM, cfg, seed=3, init_scale=0.08)
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        cfg = GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                            use_parallel_residual=True)
        hf = make_tiny(GPTNeoXForCausalLM, cfg, seed=3, init_scale=0.08)
    return save_hf_model(hf, path)


def load_tiny(path: str, batch: int = 3) -> ExLlamaV2:
    cfg = ExLlamaV2Config(path)
    cfg.dtype = "float32"
    cfg.max_seq_len = 256
    cfg.max_batch_size = batch
    model = ExLlamaV2(cfg)
    model.load()
    return model


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tmp_path_factory):
    return load_tiny(build_tiny(request.param, tmp_path_factory.mktemp(request.param)))


def generate(model, prompt: torch.Tensor, steps: int, cache=None):
    """Greedy cached generation in the ExLlamaV2 generators' style: prefill prompt[:, :-1], then one token per
    call starting with the last prompt token (so decode step k yields new token k). Returns (tokens, logits of
    every decode step (b, steps, V))."""
    b = prompt.shape[0]
    cache = cache or ExLlamaV2Cache(model, batch_size=b, max_seq_len=prompt.shape[1] + steps + 1)
    if prompt.shape[1] > 1:
        model.forward(prompt[:, :-1], cache, preprocess_only=True)
    tok = prompt[:, -1:]
    out_tokens, out_logits = [], []
    for _ in range(steps):
        logits = model.forward(tok, cache)
        out_logits.append(logits)
        tok = logits[:, -1:].argmax(-1)
        out_tokens.append(tok)
    return torch.cat(out_tokens, 1), torch.cat(out_logits, 1)


def prompts(model, b: int = 3, n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (b, n), generator=g)


def test_tiny_models_load(tiny):
    assert tiny.forward(prompts(tiny, 1, 4)).shape == (1, 4, tiny.config.vocab_size)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return load_tiny(build_tiny("llama", tmp_path_factory.mktemp("llama_only")))
