"""InternLM2: Llama computation under other tensor names, with q/k/v fused in one `attention.wqkv` tensor in the
"altpack" layout (per KV head: its group's q heads, then k, then v). HF transformers has no InternLM2 model (it
needs remote code), so parity is checked against HF Llama with the same weights repacked.
"""

from ..architecture import ArchParams, default_keys, register

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
