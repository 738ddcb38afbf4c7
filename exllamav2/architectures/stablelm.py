"""StableLM (2): LayerNorm with bias, partial rotary, optional q/k/v bias, optional per-head q/k LayerNorm
(`qk_layernorm`, weights stored per head), optional parallel residual (`use_parallel_residual`)."""

from ..architecture import ArchParams, default_keys, register

STABLELM = ArchParams(
    family="stablelm",
    norm="layernorm",
    norm_bias=True,
    headnorm="layernorm",
    keys={**default_keys(), "norm_eps": "layer_norm_eps",
          "attn_q_norm": ".self_attn.q_layernorm", "attn_k_norm": ".self_attn.k_layernorm"},
)


def _configure(p: ArchParams, cfg: dict) -> None:
    p.attention_bias_qkv = bool(cfg.get("use_qkv_bias", False))
    p.use_qk_norm = bool(cfg.get("qk_layernorm", False))
    if cfg.get("use_parallel_residual", False):
        # h + attn(ln(h)) + mlp(ln(h)): one shared input norm, no post-attention norm
        p.parallel_decoder_blocks = True
        p.keys = {**p.keys, "norm_2": None}


register("StableLmForCausalLM", STABLELM, configure=_configure,
         notes="LayerNorm, partial rotary, optional qkv bias, per-head q/k LayerNorm, parallel residual")
