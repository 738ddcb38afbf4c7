"""Qwen2-MoE and Qwen3-MoE: MoE MLP with `norm_topk_prob`, dense layers per `decoder_sparse_step` /
`mlp_only_layers`; Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate(x)) and q/k/v bias;
Qwen3-MoE adds per-head RMS q/k norm."""

from ..architecture import ArchParams, default_keys, register

_MOE_KEYS = {
    **default_keys(),
    "mlp_expert_gate": ".mlp.gate",
    "moe_w1": ".mlp.experts.*.gate_proj",
    "moe_w3": ".mlp.experts.*.up_proj",
    "moe_w2": ".mlp.experts.*.down_proj",
    "moe_fused_experts": ".mlp.experts",
}


def _configure_moe(p: ArchParams, cfg: dict) -> None:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    get = lambda k, d=None: cfg.get(k, text.get(k, d))
    n = int(get("num_hidden_layers", 0) or 0)
    step = int(get("decoder_sparse_step", 1) or 1)
    only = set(get("mlp_only_layers", []) or [])
    has_experts = int(get("num_experts", get("num_local_experts", 0)) or 0) > 0
    p.moe_dense_layers = tuple(i for i in range(n) if i in only or not has_experts or (i + 1) % step != 0)
    p.moe_norm_topk_prob = bool(get("norm_topk_prob", False))
    p.swa = bool(get("use_sliding_window", False))


def _configure_qwen2_moe(p: ArchParams, cfg: dict) -> None:
    _configure_moe(p, cfg)
    p.attention_bias_qkv = bool(cfg.get("qkv_bias", True))


QWEN2_MOE = ArchParams(
    family="qwen_moe",
    is_moe=True,
    attention_bias_qkv=True,
    keys={**_MOE_KEYS, "moe_shared_expert": ".mlp.shared_expert", "moe_shared_expert_gate": ".mlp.shared_expert_gate"},
)

QWEN3_MOE = ArchParams(family="qwen_moe", is_moe=True, use_qk_norm=True, headnorm="rmsnorm", keys=_MOE_KEYS)

register("Qwen2MoeForCausalLM", QWEN2_MOE, configure=_configure_qwen2_moe,
         notes="MoE with gated shared expert, norm_topk_prob, decoder_sparse_step/mlp_only_layers; q/k/v bias; LoRA not applied to experts")
register("Qwen3MoeForCausalLM", QWEN3_MOE, configure=_configure_moe,
         notes="MoE with norm_topk_prob, decoder_sparse_step/mlp_only_layers; RMS q/k norm per head; LoRA not applied to experts")
