"""Gemma family: Gemma 1, Gemma 2 and Gemma 3 (text model, also the text part of Gemma3ForConditionalGeneration).

Norm weights are stored as w and applied as (1 + w); embeddings are scaled by sqrt(hidden) rounded to the
activation dtype. Gemma 2/3 add post-attention/post-MLP norms, sliding-window layers per `layer_types`
(each with its own RoPE base in Gemma 3), `query_pre_attn_scalar`, and (Gemma 2) attention/final softcaps.
GGUF: llama.cpp's "gemma3" (text model).
"""

from ..architecture import ArchParams, GGUFArch, default_keys, register, register_gguf
from ..gguf.names import BLOCK_COMMON, QK_NORM

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
# HF's Gemma3ForConditionalGeneration applies no final logit softcap, whatever text_config says (released Gemma 3
# checkpoints set none); Gemma3ForCausalLM does apply it
GEMMA3_MM.config_aliases = {**GEMMA3.config_aliases, "final_logit_softcapping": []}

register("GemmaForCausalLM", GEMMA, notes="Gemma 1: (1 + w) norms, scaled embeddings, GeGLU")
register("Gemma2ForCausalLM", GEMMA2,
         notes="four norms, alternating sliding window (layer_types), attention and final logit softcap, "
               "query_pre_attn_scalar")
register("Gemma3ForCausalLM", GEMMA3,
         notes="text model: q/k RMS norm (1 + w), sliding layers with their own RoPE base, query_pre_attn_scalar")
register("Gemma3ForConditionalGeneration", GEMMA3_MM,
         notes="text part only (config under text_config); vision tower ignored, image inputs unsupported")


# ------------------------------------------------------------------------------------------------ GGUF

# Gemma 3 has four norms per layer; llama.cpp's "ffn_norm" is HF's pre-feedforward norm there.
_GGUF_GEMMA3_BLOCK = {
    **BLOCK_COMMON,
    **QK_NORM,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Values llama.cpp hard-codes for Gemma 3 rather than storing them in the file.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_27B_LAYERS = 62


def _gguf_gemma3_layer_types(meta, num_layers: int) -> list[str]:
    key = f"{meta.arch}.attention.sliding_window_pattern"
    pattern = meta.get(key, GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):
        # Per-layer booleans, true for sliding-window layers.
        if len(pattern) != num_layers:
            raise meta.error(f"{key} has {len(pattern)} entries, expected {num_layers}")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    pattern = int(pattern)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def _gguf_gemma3_config(meta, cfg: dict) -> None:
    """Gemma 3's config.json fields from llama.cpp's metadata: layer types, the sliding layers' own RoPE base,
    query_pre_attn_scalar and the softcaps."""
    arch, num_layers = meta.arch, cfg["num_hidden_layers"]
    local_theta = float(meta.get(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA))
    layer_types = _gguf_gemma3_layer_types(meta, num_layers)
    # llama.cpp scales attention by 1/sqrt(hidden/heads) for the 27B model only, else 1/sqrt(head_dim).
    scalar = (cfg["hidden_size"] // cfg["num_attention_heads"] if num_layers == GEMMA3_27B_LAYERS
              else cfg["head_dim"])
    cfg.update({
        "sliding_window": meta.uniform_int(f"{arch}.attention.sliding_window"),
        "layer_types": layer_types,
        "rope_local_base_freq": local_theta,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping"),
        "attention_bias": False,
        "use_bidirectional_attention": False,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
            "full_attention": meta.full_rope,
        },
    })
    if "full_attention" in layer_types and "sliding_attention" in layer_types:
        period = layer_types.index("full_attention") + 1
        if layer_types == ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]:
            cfg["sliding_window_pattern"] = period


register_gguf(GGUFArch("gemma3", "Gemma3ForCausalLM", "gemma3_text", _GGUF_GEMMA3_BLOCK, norm_offset=1.0,
                       hidden_act_key="hidden_activation", hidden_act="gelu_pytorch_tanh",
                       config=_gguf_gemma3_config))
