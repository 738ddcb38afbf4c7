"""Starcoder2: LayerNorm with bias, biased attention and ungated GELU MLP (c_fc/c_proj), sliding window."""

from ..architecture import ArchParams, default_keys, register

STARCODER2 = ArchParams(
    family="starcoder2",
    norm="layernorm",
    norm_bias=True,
    mlp_gate=False,
    mlp_act_func="gelu_tanh",
    swa=True,
    keys={**default_keys(), "norm_eps": "norm_epsilon", "mlp_up": ".mlp.c_fc", "mlp_down": ".mlp.c_proj"},
)


def _configure(p: ArchParams, cfg: dict) -> None:
    bias = bool(cfg.get("use_bias", True))
    p.attention_bias_qkv = p.attention_bias_o = p.mlp_bias = bias


register("Starcoder2ForCausalLM", STARCODER2, configure=_configure,
         notes="LayerNorm, use_bias on attention and MLP, ungated GELU MLP, sliding window honoured")
