"""Llama-family architectures against HF transformers through the shared parity runner."""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from parity import ParityRunner, make_tiny, save_hf_model

COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5)

CASES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "llama_mha_tied": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=6, tie_word_embeddings=True)),
    "llama_mqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=1, attention_bias=True)),
    "llama3_rope": (LlamaForCausalLM, LlamaConfig, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "linear_rope": (LlamaForCausalLM, LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "dynamic_rope": (LlamaForCausalLM, LlamaConfig, dict(max_position_embeddings=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "yarn_rope": (LlamaForCausalLM, LlamaConfig, dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "longrope": (LlamaForCausalLM, LlamaConfig, dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "longrope", "long_factor": [1.0 + 0.3 * i for i in range(4)], "short_factor": [1.0 + 0.05 * i for i in range(4)],
        "original_max_position_embeddings": 24})),
    "gelu_mlp": (LlamaForCausalLM, LlamaConfig, dict(hidden_act="gelu_pytorch_tanh", mlp_bias=True)),
    "mistral_swa": (MistralForCausalLM, MistralConfig, dict(sliding_window=8)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=16)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def runner(request, tmp_path_factory):
    model_cls, cfg_cls, extra = CASES[request.param]
    hf = make_tiny(model_cls, cfg_cls(**{**COMMON, **extra}), seed=hash(request.param) % 1000, init_scale=0.08)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return ParityRunner(path, hf, cache_equals_full=request.param not in ("dynamic_rope", "longrope"))


def test_logits_prefill_and_cached_decode(runner):
    runner.check_prefill_and_decode()


def test_padded_batch_equals_alone(runner):
    runner.check_padded_batch()


def test_chunked_prefill(runner):
    runner.check_chunked_prefill()


def test_bf16(runner):
    runner.check_bf16()


def test_intermediates(runner):
    runner.check_intermediates()


def test_logits_have_spread(runner):
    # guards against a vacuous comparison: random weights must give distinguishable logits
    assert runner.ref.std().item() > 0.05


def test_yi_key_names(tmp_path):
    """YiForCausalLM has no HF model: an HF Llama saved under Yi's norm names must give HF Llama's logits."""
    import json

    from safetensors.torch import load_file, save_file

    hf = make_tiny(LlamaForCausalLM, LlamaConfig(**COMMON), seed=9, init_scale=0.08)
    path = save_hf_model(hf, tmp_path)
    st = tmp_path / "model.safetensors"
    t = load_file(str(st))
    t = {k.replace(".input_layernorm.", ".ln1.").replace(".post_attention_layernorm.", ".ln2."): v for k, v in t.items()}
    save_file(t, str(st))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["YiForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    runner = ParityRunner(path, hf)
    runner.check_prefill_and_decode()


def test_qwen2_max_window_layers_without_layer_types(tmp_path):
    """Configs written before layer_types existed: sliding window only from max_window_layers on, as HF does."""
    import json

    cfg = Qwen2Config(**{**COMMON, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2})
    hf = make_tiny(Qwen2ForCausalLM, cfg, seed=21, init_scale=0.08)
    path = save_hf_model(hf, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(c))
    runner = ParityRunner(path, hf)
    model = runner.check_prefill_and_decode()
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
