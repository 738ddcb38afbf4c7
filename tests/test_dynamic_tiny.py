"""A tiny random Llama with SmolLM2's real tokenizer (so text prompts, chat templates and stop strings work), the
greedy reference loop (model.forward + argmax over a contiguous cache), and checks of the paged attention against
the contiguous path. Imported by the other dynamic-generator and server tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.attn_params import PagedParams
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
from exllamav2.tokenizer import ExLlamaV2Tokenizer
from parity import make_tiny, save_hf_model

PAGE = 16


def build_tiny_dir(path, sliding_window: int | None = None, head_dim: int = 16) -> str:
    from exllamav2.default_models import smollm2_gguf_path
    from exllamav2.tokenizer.gguf_tokenizer import save_hf_tokenizer_files, tokenizer_from_gguf

    info = tokenizer_from_gguf(smollm2_gguf_path())
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                      rms_norm_eps=1e-5, bos_token_id=info.bos_token_id, eos_token_id=info.eos_token_id,
                      tie_word_embeddings=True)
    hf = make_tiny(LlamaForCausalLM, cfg, seed=3, init_scale=0.2)
    save_hf_model(hf, path)
    save_hf_tokenizer_files(info, path)
    return str(path)


def load_tiny(model_dir: str, dtype: str = "float32"):
    cfg = ExLlamaV2Config(model_dir)
    cfg.dtype = dtype
    model = ExLlamaV2(cfg)
    model.load()
    return model, ExLlamaV2Tokenizer(cfg)


def greedy_reference(model, ids: torch.Tensor, max_new: int, stop_ids=()) -> list[int]:
    """Plain loop: prefill the whole prompt, then one token at a time, argmax."""
    cache = ExLlamaV2Cache(model, 1, ids.shape[1] + max_new + 1)
    logits = model.forward(ids, cache, last_id_only=True)
    out = []
    for _ in range(max_new):
        t = int(logits[0, -1].argmax())
        out.append(t)
        if t in stop_ids:
            break
        logits = model.forward(torch.tensor([[t]]), cache)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    d = build_tiny_dir(tmp_path_factory.mktemp("tiny_llama_smol_tok"))
    model, tok = load_tiny(d)
    return d, model, tok


def test_paged_forward_equals_contiguous(tiny):
    """Three sequences of different lengths (one prefilling, two decoding) in one packed forward give the same
    logits as each sequence through the contiguous cache."""
    _, model, _ = tiny
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (1, n), generator=g) for n in (37, 5, 20)]
    cache = ExLlamaV2Cache(model, 1, 8 * PAGE)
    gen = ExLlamaV2DynamicGenerator(model, cache, None, page_size=PAGE)
    tables = [[5, 0, 7], [3], [1, 6]]  # deliberately scattered pages
    # prefill all but the last 1 / last 3 tokens of each, then one packed step with mixed lengths
    feed = [1, 1, 3]
    past = [s.shape[1] - f for s, f in zip(seqs, feed)]
    pre = PagedParams(tables, past, [1, 1, 1], PAGE)  # validate construction
    assert pre.positions.tolist() == [[p for p in past]]
    for s, t, p in zip(seqs, tables, past):
        gen._forward(s[:, :p], PagedParams([t], [0], [p], PAGE), torch.tensor([p - 1]))
    ids = torch.cat([s[:, p:] for s, p in zip(seqs, past)], 1)
    params = PagedParams(tables, past, feed, PAGE)
    rows = torch.arange(ids.shape[1])
    got = gen._forward(ids, params, rows)
    expect = torch.cat([model.forward(s)[0, p:] for s, p in zip(seqs, past)], 0)
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=1e-4)


def test_paged_params_validation():
    with pytest.raises(ValueError, match="needs 20 positions"):
        PagedParams([[0]], [10], [10], PAGE)
    with pytest.raises(ValueError, match="at least one token"):
        PagedParams([[0]], [0], [0], PAGE)
