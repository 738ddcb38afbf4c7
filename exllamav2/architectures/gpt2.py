"""GPT-2: Conv1D weights stored (in, out), fused c_attn, learned position embeddings (`wpe`), no RoPE,
LayerNorm with bias, GELU-new MLP with biases, head tied to `wte`."""

from ..architecture import ArchParams, RopeStyle, UnsupportedArchitectureError, default_keys, register

GPT2_KEYS = {
    **default_keys(),
    "norm_eps": "layer_norm_epsilon",
    "embed_tokens": "transformer.wte",
    "learned_pos_emb": "transformer.wpe",
    "layers": "transformer.h",
    "norm": "transformer.ln_f",
    "norm_1": ".ln_1",
    "norm_2": ".ln_2",
    "fused_qkv": ".attn.c_attn",
    "attn_q": ".attn.q_proj",
    "attn_k": ".attn.k_proj",
    "attn_v": ".attn.v_proj",
    "attn_o": ".attn.c_proj",
    "mlp_up": ".mlp.c_fc",
    "mlp_down": ".mlp.c_proj",
}

GPT2 = ArchParams(family="gpt2", keys=GPT2_KEYS, orig_weights_transposed=True, norm="layernorm", norm_bias=True,
                  mlp_gate=False, mlp_act_func="gelu_new", mlp_bias=True, attention_bias_qkv=True,
                  attention_bias_o=True, rope_style=RopeStyle.NONE)


def configure(p: ArchParams, cfg: dict) -> None:
    for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                      ("add_cross_attention", False)):
        if bool(cfg.get(field, ok)) != ok:
            raise UnsupportedArchitectureError(f"config.json: GPT2LMHeadModel with {field}={cfg[field]!r} is not "
                                               f"supported (expected {ok})")


register("GPT2LMHeadModel", GPT2, configure=configure, notes="Conv1D weights, learned positions, no RoPE")
