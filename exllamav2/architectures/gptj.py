"""GPT-J: parallel block under one LayerNorm, separate q/k/v without bias, GPT-J (interleaved pair) rotary on the
first `rotary_dim` channels, GELU-new MLP (fc_in/fc_out) with biases, head with bias."""

from ..architecture import ArchParams, RopeStyle, default_keys, register

GPTJ_KEYS = {
    **default_keys(),
    "norm_eps": "layer_norm_epsilon",
    "embed_tokens": "transformer.wte",
    "layers": "transformer.h",
    "norm": "transformer.ln_f",
    "lm_head": "lm_head",
    "norm_1": ".ln_1",
    "norm_2": None,
    "attn_q": ".attn.q_proj",
    "attn_k": ".attn.k_proj",
    "attn_v": ".attn.v_proj",
    "attn_o": ".attn.out_proj",
    "mlp_up": ".mlp.fc_in",
    "mlp_down": ".mlp.fc_out",
}

GPTJ = ArchParams(family="gptj", keys=GPTJ_KEYS, norm="layernorm", norm_bias=True, mlp_gate=False,
                  mlp_act_func="gelu_new", mlp_bias=True, rope_style=RopeStyle.GPTJ, parallel_decoder_blocks=True,
                  head_bias=True)

register("GPTJForCausalLM", GPTJ, notes="parallel block, interleaved partial rotary")
