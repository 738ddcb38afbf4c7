"""Phi-1/1.5/2 (parallel block, partial rotary, LayerNorm, biases everywhere, optional per-head q/k LayerNorm)
and Phi-3 (Llama-like sequential block with fused qkv_proj and gate_up_proj, longrope scaling)."""

from ..architecture import ArchParams, default_keys, register

PHI_KEYS = {
    **default_keys(),
    "norm_eps": "layer_norm_eps",
    "norm": "model.final_layernorm",
    "norm_2": None,
    "attn_o": ".self_attn.dense",
    "attn_q_norm": ".self_attn.q_layernorm",
    "attn_k_norm": ".self_attn.k_layernorm",
    "mlp_up": ".mlp.fc1",
    "mlp_down": ".mlp.fc2",
}

PHI = ArchParams(family="phi", keys=PHI_KEYS, norm="layernorm", norm_bias=True, headnorm="layernorm",
                 mlp_gate=False, mlp_act_func="gelu_new", mlp_bias=True, attention_bias_qkv=True,
                 attention_bias_o=True, parallel_decoder_blocks=True, head_bias=True)


def configure_phi(p: ArchParams, cfg: dict) -> None:
    # HF's PhiConfig calls the per-head q/k LayerNorm `qk_layernorm`
    p.use_qk_norm = bool(cfg.get("qk_layernorm", cfg.get("use_qk_norm", False)))


register("PhiForCausalLM", PHI, configure=configure_phi, notes="parallel block, partial rotary, optional qk_layernorm")

PHI3_KEYS = {
    **default_keys(),
    "fused_qkv": ".self_attn.qkv_proj",
    "fused_mlp_12": ".mlp.gate_up_proj",
}

PHI3 = ArchParams(family="phi3", keys=PHI3_KEYS)

register("Phi3ForCausalLM", PHI3, notes="fused qkv_proj and gate_up_proj, longrope",
         configure=lambda p, cfg: setattr(p, "swa", bool(cfg.get("sliding_window"))))
