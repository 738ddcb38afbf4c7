"""Llama-family variants that differ from Llama only in tensor names or a few flags.

InternLM2: Llama computation under other tensor names, with q/k/v fused in one `attention.wqkv` tensor in the
"altpack" layout (per KV head: its group's q heads, then k, then v). HF transformers has no InternLM2 model (it
needs remote code), so parity is checked against HF Llama with the same weights repacked.
Also here: Ministral (per-layer sliding window from layer_types), Helium (interleaved RoPE), Ernie 4.5
(interleaved RoPE, `use_bias`), Seed-OSS (separate q/k/v and o biases).
"""

from ..architecture import ArchParams, RopeStyle, default_keys, register

INTERNLM2 = ArchParams(
    family="llama",
    fused_qkv_altpack=True,
    keys={
        **default_keys(),
        "embed_tokens": "model.tok_embeddings",
        "lm_head": "output",
        "norm_1": ".attention_norm",
        "norm_2": ".ffn_norm",
        "fused_qkv": ".attention.wqkv",
        # names of the q/k/v slices of wqkv (no such tensors exist on disk)
        "attn_q": ".attention.wq",
        "attn_k": ".attention.wk",
        "attn_v": ".attention.wv",
        "attn_o": ".attention.wo",
        "mlp_gate": ".feed_forward.w1",
        "mlp_up": ".feed_forward.w3",
        "mlp_down": ".feed_forward.w2",
    },
)


def _configure(p: ArchParams, cfg: dict) -> None:
    bias = bool(cfg.get("bias", False))  # InternLM2's `bias` covers wqkv and wo
    p.attention_bias_qkv = p.attention_bias_o = bias


register("InternLM2ForCausalLM", INTERNLM2, configure=_configure,
         notes="altpack fused wqkv; checked against HF Llama with repacked weights (HF has no InternLM2 model)")


register("MinistralForCausalLM", ArchParams(family="llama"), notes="Mistral with per-layer sliding window (layer_types)")

register("HeliumForCausalLM", ArchParams(family="llama", rope_style=RopeStyle.GPTJ),
         configure=lambda p, cfg: setattr(p, "attention_bias_qkv", bool(cfg.get("attention_bias", False))),
         notes="Llama with interleaved RoPE; attention_bias covers q/k/v only")


def _configure_ernie(p: ArchParams, cfg: dict) -> None:
    p.attention_bias_qkv = p.attention_bias_o = p.mlp_bias = bool(cfg.get("use_bias", False))


register("Ernie4_5ForCausalLM", ArchParams(family="llama", rope_style=RopeStyle.GPTJ), configure=_configure_ernie,
         notes="Llama with interleaved RoPE and use_bias (dense model only; the MoE variant is not supported)")


def _configure_seed_oss(p: ArchParams, cfg: dict) -> None:
    p.attention_bias_qkv = bool(cfg.get("attention_bias", False))
    p.attention_bias_o = bool(cfg.get("attention_out_bias", False))


register("SeedOssForCausalLM", ArchParams(family="llama"), configure=_configure_seed_oss,
         notes="Llama with separate q/k/v (attention_bias) and o (attention_out_bias) biases")
