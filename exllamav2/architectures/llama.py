"""Llama family: Llama 1/2/3, Mistral, Qwen2, Qwen3, and variants that differ only in key names or flags
(Yi, Ministral, Helium, Ernie 4.5, Seed-OSS). GGUF: llama.cpp's "llama", "qwen2" and "qwen3"."""

from ..architecture import ArchParams, GGUFArch, RopeStyle, register, register_gguf
from ..gguf.names import BLOCK_COMMON, QK_NORM

LLAMA = ArchParams(family="llama", supports_tp=True)

register("LlamaForCausalLM", LLAMA, notes="Llama 1/2/3 (llama3, linear, dynamic, yarn, longrope RoPE scaling)")

# Mistral honours config.sliding_window on every layer (the original ignored it)
register("MistralForCausalLM", ArchParams(family="llama", swa=True), notes="sliding window honoured")

register("Qwen2ForCausalLM", ArchParams(family="llama", attention_bias_qkv=True, swa=False),
         notes="q/k/v bias; sliding window only when use_sliding_window is set",
         configure=lambda p, cfg: setattr(p, "swa", bool(cfg.get("use_sliding_window", False))))

register("Qwen3ForCausalLM", ArchParams(family="llama", use_qk_norm=True, headnorm="rmsnorm"),
         notes="RMS q/k norm per head", configure=lambda p, cfg: setattr(p, "swa", bool(cfg.get("use_sliding_window", False))))

# Yi checkpoints in the original format rename the norms
register("YiForCausalLM", ArchParams(family="llama", keys={**LLAMA.keys, "norm_1": ".ln1", "norm_2": ".ln2"}),
         notes="Llama with ln1/ln2 norm names")

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


# ------------------------------------------------------------------------------------------------ GGUF

_GGUF_BLOCK = {**BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"}

# llama.cpp writes Mistral models as "llama"; they read as LlamaForCausalLM, as in HF's GGUF loader
# (which names them "mistral" only when general.name is exactly "mistral"). llama.cpp permutes Llama's q/k
# rows, and older Llama files give head_dim only as rope.dimension_count. A "llama" file with experts is Mixtral
# (mixtral.py).
register_gguf(GGUFArch("llama", "LlamaForCausalLM", "llama", _GGUF_BLOCK, permuted_qk=True, head_dim_from_rope=True))


def _gguf_qwen2_config(meta, cfg: dict) -> None:
    # Qwen2 has q/k/v biases; a file without them reads as attention_bias False
    cfg["attention_bias"] = "blk.0.attn_q.bias" in meta.tensor_names


register_gguf(GGUFArch("qwen2", "Qwen2ForCausalLM", "qwen2", _GGUF_BLOCK, config=_gguf_qwen2_config))
register_gguf(GGUFArch("qwen3", "Qwen3ForCausalLM", "qwen3", {**_GGUF_BLOCK, **QK_NORM}))
