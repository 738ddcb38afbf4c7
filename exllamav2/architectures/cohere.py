"""Cohere (Command-R) and Cohere2: parallel block under one bias-free LayerNorm, interleaved (GPT-J style) rotary,
`logit_scale` on the head, tied embeddings, optional per-head q/k LayerNorm (`use_qk_norm`). Cohere2 adds
sliding-window layers (config `layer_types`) and uses RoPE on those only: full-attention layers are NoPE."""

from ..architecture import ArchParams, RopeStyle, default_keys, register

COHERE_KEYS = {**default_keys(), "norm_eps": "layer_norm_eps", "norm_2": None}

COHERE = ArchParams(family="cohere", keys=COHERE_KEYS, norm="layernorm", norm_bias=False, headnorm="layernorm",
                    headnorm_per_head=True, rope_style=RopeStyle.GPTJ, parallel_decoder_blocks=True)

register("CohereForCausalLM", COHERE, notes="parallel block, interleaved rotary, logit_scale, per-head qk norm")

COHERE2 = ArchParams(family="cohere2", keys=COHERE_KEYS, norm="layernorm", norm_bias=False, headnorm="layernorm",
                     headnorm_per_head=True, rope_style=RopeStyle.GPTJ, parallel_decoder_blocks=True,
                     alternating_swa=True, nope_full_attention=True)

register("Cohere2ForCausalLM", COHERE2, notes="Cohere with sliding-window layers; full-attention layers without RoPE")
