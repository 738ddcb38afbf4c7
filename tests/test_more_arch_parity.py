"""Gemma 1/2/3, Starcoder2, Granite, StableLM, OLMo 2, InternLM2 and Llama variants against HF transformers through
the shared parity runner (fp32 logits, cache, padded batch, chunked prefill, bf16, intermediates)."""

import os
import sys

import pytest
import torch
import transformers as tf

from parity import ParityRunner, default_hf_names, make_tiny, save_hf_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from fuzz_dense_configs import to_internlm2  # noqa: E402  (InternLM2 has no HF model: Llama weights repacked)

COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)

# sliding windows (8) are shorter than the runner's prompts (32 + 16 decode steps)
CASES = {
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig, dict(head_dim=16)),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, dict(
        sliding_window=8, query_pre_attn_scalar=12, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, dict(
        sliding_window=8, query_pre_attn_scalar=12, head_dim=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "gemma3_softcap": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, dict(
        sliding_window=8, attn_logit_softcapping=4.0, final_logit_softcapping=2.0, tie_word_embeddings=False,
        sliding_window_pattern=2)),
    # text-only forward of the multimodal model (config under text_config, weights under language_model.model.*)
    "gemma3_mm": (tf.Gemma3ForConditionalGeneration, lambda **text: tf.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4), dict(sliding_window=8, query_pre_attn_scalar=12, head_dim=16)),
    "starcoder2": (tf.Starcoder2ForCausalLM, tf.Starcoder2Config, dict(sliding_window=8, norm_epsilon=1e-5)),
    "granite": (tf.GraniteForCausalLM, tf.GraniteConfig, dict(
        embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2, logits_scaling=2.5,
        tie_word_embeddings=True)),
    "stablelm": (tf.StableLmForCausalLM, tf.StableLmConfig, dict(
        partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True, num_key_value_heads=6)),
    "stablelm_parallel": (tf.StableLmForCausalLM, tf.StableLmConfig, dict(
        partial_rotary_factor=0.5, use_parallel_residual=True, num_key_value_heads=3)),
    "olmo2": (tf.Olmo2ForCausalLM, tf.Olmo2Config, dict(rms_norm_eps=1e-6)),
    "ministral": (tf.MinistralForCausalLM, tf.MinistralConfig, dict(
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "helium": (tf.HeliumForCausalLM, tf.HeliumConfig, dict(attention_bias=True)),
    "ernie4_5": (tf.Ernie4_5ForCausalLM, tf.Ernie4_5Config, dict(use_bias=True)),
    "seed_oss": (tf.SeedOssForCausalLM, tf.SeedOssConfig, dict(attention_bias=True, attention_out_bias=False)),
}


def _build(name):
    model_cls, cfg_cls, extra = CASES[name]
    hf = make_tiny(model_cls, cfg_cls(**{**COMMON, **extra}), seed=sum(map(ord, name)), init_scale=0.08)
    if name.startswith("gemma"):
        # Gemma applies (1 + w): shift the random norm weights so the effective weights are ~1 as in other
        # families (effective weights ~2 on q/k norms make attention so sharp that even HF's own bf16 run drifts)
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if "norm" in pname and pname.endswith("weight"):
                    p.sub_(1.0)
    return hf


# variants of an architecture already covered: run with `pytest -m slow` (or RUN_SLOW=1)
SLOW: set = set()  # every case runs by default


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def runner(request, tmp_path_factory):
    hf = _build(request.param)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return ParityRunner(path, hf)


def test_logits_prefill_and_cached_decode(runner):
    runner.check_prefill_and_decode()


def test_padded_batch_equals_alone(runner):
    runner.check_padded_batch()


def test_chunked_prefill(runner):
    runner.check_chunked_prefill()


def test_bf16(runner):
    runner.check_bf16()


def _hf_names(m):
    if m.name == "ParallelDecoder":
        return {"post_norm": (m.input_layernorm.key, "out"), "attn_output": (m.attn.o_proj.key, "in"),
                "pre_down": (m.mlp.down_proj.key, "in")}
    return default_hf_names(m, m.model)


def test_intermediates(runner):
    runner.check_intermediates(hf_names=_hf_names)


def test_logits_have_spread(runner):
    assert runner.ref.std().item() > 0.05


# ---------------------------------------------------------------- InternLM2 (no HF model: Llama weights repacked)

@pytest.fixture(scope="module", params=["gqa_bias", "mha"])
def internlm2(request, tmp_path_factory):
    extra = dict(attention_bias=True) if request.param == "gqa_bias" else dict(num_key_value_heads=6)
    hf = make_tiny(tf.LlamaForCausalLM, tf.LlamaConfig(**{**COMMON, **extra, "head_dim": 8}), seed=11, init_scale=0.08)
    path = to_internlm2(hf, str(tmp_path_factory.mktemp("internlm2_" + request.param)), "bias" in request.param)
    return ParityRunner(path, hf)


def test_internlm2_altpack_matches_llama(internlm2):
    internlm2.check_prefill_and_decode()
    internlm2.check_padded_batch()


def test_architecture_table_lists_every_supported_string():
    from exllamav2.architecture import supported_architectures
    from exllamav2.architectures.table import architecture_table
    rows = architecture_table()
    assert [r["architecture"] for r in rows] == sorted(supported_architectures())
    mine = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
            "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Starcoder2ForCausalLM",
            "GraniteForCausalLM", "StableLmForCausalLM", "Olmo2ForCausalLM", "InternLM2ForCausalLM",
            "MinistralForCausalLM", "HeliumForCausalLM", "Ernie4_5ForCausalLM", "SeedOssForCausalLM"}
    assert mine <= {r["architecture"] for r in rows}
    for r in rows:
        assert r["family"] and r["notes"], r
