"""GPT-NeoX (Pythia): fused per-head-interleaved query_key_value, partial rotary, LayerNorm with bias, GELU MLP
with biases, untied `embed_out` head. Parallel residual (two norms of the same input) unless
`use_parallel_residual` is false, then a sequential block with the same two norms."""

from ..architecture import ArchParams, default_keys, register

GPT_NEOX_KEYS = {
    **default_keys(),
    "norm_eps": "layer_norm_eps",
    "embed_tokens": "gpt_neox.embed_in",
    "layers": "gpt_neox.layers",
    "norm": "gpt_neox.final_layer_norm",
    "lm_head": "embed_out",
    "norm_1": ".input_layernorm",
    "norm_2": ".post_attention_layernorm",
    # rows are [q_h, k_h, v_h] per head: the altpack layout with one q head per KV head
    "fused_qkv": ".attention.query_key_value",
    "attn_q": ".attention.q_proj",
    "attn_k": ".attention.k_proj",
    "attn_v": ".attention.v_proj",
    "attn_o": ".attention.dense",
    "mlp_up": ".mlp.dense_h_to_4h",
    "mlp_down": ".mlp.dense_4h_to_h",
}

GPT_NEOX = ArchParams(family="gpt_neox", keys=GPT_NEOX_KEYS, norm="layernorm", norm_bias=True, mlp_gate=False,
                      mlp_act_func="gelu", mlp_bias=True, attention_bias_qkv=True, attention_bias_o=True,
                      fused_qkv_altpack=True, parallel_decoder_blocks=True)


def configure(p: ArchParams, cfg: dict) -> None:
    p.parallel_decoder_blocks = bool(cfg.get("use_parallel_residual", True))
    bias = bool(cfg.get("attention_bias", True))
    p.attention_bias_qkv = p.attention_bias_o = bias


register("GPTNeoXForCausalLM", GPT_NEOX, configure=configure,
         notes="parallel or sequential residual (use_parallel_residual), partial rotary")
