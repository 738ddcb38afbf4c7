"""Gemma family: Gemma 1, Gemma 2 and Gemma 3 (text model, also the text part of Gemma3ForConditionalGeneration).

Norm weights are stored as w and applied as (1 + w); embeddings are scaled by sqrt(hidden) rounded to the
activation dtype. Gemma 2/3 add post-attention/post-MLP norms, sliding-window layers per `layer_types`
(each with its own RoPE base in Gemma 3), `query_pre_attn_scalar`, and (Gemma 2) attention/final softcaps.
"""

from ..architecture import ArchParams, default_keys, register

GEMMA = ArchParams(
    family="gemma",
    norm_constant_bias=1.0,
    normalize_embeddings=True,
    mlp_act_func="gelu_tanh",
    requires_bos=True,
)

_FOUR_NORM_KEYS = {
    **default_keys(),
    "norm_1": ".input_layernorm",
    "norm_1_post": ".post_attention_layernorm",
    "norm_2": ".pre_feedforward_layernorm",
    "norm_2_post": ".post_feedforward_layernorm",
}

# fp32 residual: Gemma 2/3 activations overflow fp16 in the residual stream
GEMMA2 = ArchParams(
    family="gemma",
    keys=_FOUR_NORM_KEYS,
    norm_constant_bias=1.0,
    normalize_embeddings=True,
    mlp_act_func="gelu_tanh",
    requires_bos=True,
    alternating_swa=True,
    residual_stream_fp32=True,
)

GEMMA3 = ArchParams(
    family="gemma",
    keys=_FOUR_NORM_KEYS,
    norm_constant_bias=1.0,
    normalize_embeddings=True,
    mlp_act_func="gelu_tanh",
    requires_bos=True,
    alternating_swa=True,
    residual_stream_fp32=True,
    use_qk_norm=True,
    headnorm="rmsnorm",
    sliding_rope_theta=10000.0,
    config_aliases={"attn_logit_softcapping": []},  # HF Gemma 3 reads the field but never applies it
)

# Gemma3ForConditionalGeneration: the text model lives under model.language_model (HF >= 4.52 layout) or
# language_model.model (older checkpoints); the vision tower and projector are not loaded
GEMMA3_MM = GEMMA3.clone()
GEMMA3_MM.keymap = [("$language_model.model.", "model.language_model."), ("$language_model.lm_head.", "lm_head.")]
GEMMA3_MM.keys = {**_FOUR_NORM_KEYS, "embed_tokens": "model.language_model.embed_tokens",
                  "layers": "model.language_model.layers", "norm": "model.language_model.norm"}

register("GemmaForCausalLM", GEMMA, notes="Gemma 1: (1 + w) norms, scaled embeddings, GeGLU")
register("Gemma2ForCausalLM", GEMMA2,
         notes="four norms, alternating sliding window (layer_types), attention and final logit softcap, "
               "query_pre_attn_scalar")
register("Gemma3ForCausalLM", GEMMA3,
         notes="text model: q/k RMS norm (1 + w), sliding layers with their own RoPE base, query_pre_attn_scalar")
register("Gemma3ForConditionalGeneration", GEMMA3_MM,
         notes="text part only (config under text_config); vision tower ignored, image inputs unsupported")
