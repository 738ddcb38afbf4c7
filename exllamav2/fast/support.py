"""Which loaded models the fast decode path can run: Llama-shaped decoders (RMSNorm, gated SiLU MLP, NeoX RoPE
over the whole head, optional q/k/v bias), nothing that changes the maths of those blocks."""

from __future__ import annotations

from ..architecture import RopeStyle


def unsupported_reason(model) -> str | None:
    """None when `exllamav2.fast` can run this model, else a sentence saying why not."""
    cfg, ap = model.config, model.archparams
    checks = [
        (not model.loaded, "the model is not loaded"),
        (ap.parallel_decoder_blocks, "parallel decoder blocks"),
        (ap.is_moe, "mixture-of-experts MLP"),
        (ap.norm != "rmsnorm", f"{ap.norm} norms"),
        (ap.norm_constant_bias != 0, "norm weights with a constant offset"),
        (not ap.mlp_gate, "ungated MLP"),
        (ap.mlp_bias, "MLP bias"),
        (ap.attention_bias_o, "o_proj bias"),
        (_act(cfg, ap) != "silu", f"activation {_act(cfg, ap)}"),
        (ap.rope_style != RopeStyle.NEOX, "RoPE style other than NeoX"),
        (cfg.rotary_dim != cfg.head_dim, "partial rotary dimension"),
        (any(rp.get("rope_type") in ("dynamic", "longrope", "su") for rp in cfg.rope_parameters.values()),
         "length-dependent RoPE scaling"),
        (bool(cfg.use_qk_norm), "q/k norms"),
        (bool(ap.keys.get("norm_1_post") or ap.keys.get("norm_2_post")), "post-norms"),
        (ap.residual_stream_fp32, "fp32 residual stream"),
        (ap.normalize_embeddings or cfg.scale_emb != 1.0, "scaled embeddings"),
        (ap.head_bias, "lm_head bias"),
        (bool(cfg.attn_logit_softcapping) or bool(cfg.final_logit_softcapping), "logit soft-capping"),
        (cfg.logit_scale != 1 or cfg.scale_depth != 1, "logit or depth scaling"),
        (any(t == "sliding_attention" for t in cfg.layer_types) and (cfg.sliding_window or 0) < cfg.max_seq_len,
         "sliding-window attention"),
        (any(d != "cpu" for d in {m.device() for m in model.modules}), "modules on a CUDA device"),
    ]
    for failed, why in checks:
        if failed and why:
            return why
    if len(model.modules) != 2 * cfg.num_hidden_layers + 3:
        return "module list is not embedding, (attention, MLP) per layer, norm, head"
    return None


def _act(cfg, ap) -> str:
    return cfg.hidden_act if isinstance(cfg.hidden_act, str) else ap.mlp_act_func
