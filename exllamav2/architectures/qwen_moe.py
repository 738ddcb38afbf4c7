"""Qwen2-MoE and Qwen3-MoE: MoE MLP with `norm_topk_prob`, dense layers per `decoder_sparse_step` /
`mlp_only_layers`; Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate(x)) and q/k/v bias;
Qwen3-MoE adds per-head RMS q/k norm. GGUF: llama.cpp's "qwen2moe" and "qwen3moe"."""

from ..architecture import ArchParams, GGUFArch, default_keys, register, register_gguf
from ..gguf.moe import dense_layers, expert_counts, norm_topk, required_int
from ..gguf.names import BLOCK_COMMON, QK_NORM

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


# ------------------------------------------------------------------------------------------------ GGUF

# the experts' `*` is the expert index: llama.cpp stacks them in one 3-D tensor (exllamav2/gguf/experts.py); blocks
# without a router keep the dense ffn_gate/ffn_up/ffn_down (mlp_only_layers)
_GGUF_BLOCK = {
    **BLOCK_COMMON,
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.*.gate_proj",
    "ffn_up_exps": "mlp.experts.*.up_proj",
    "ffn_down_exps": "mlp.experts.*.down_proj",
}
_GGUF_SHARED = {
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}


def _gguf_moe_config(meta, cfg: dict, topk_norm: bool) -> None:
    cfg["num_experts"], cfg["num_experts_per_tok"] = expert_counts(meta)
    cfg["moe_intermediate_size"] = required_int(meta, "expert_feed_forward_length")
    if cfg["intermediate_size"] is None:  # only dense layers use it
        cfg["intermediate_size"] = cfg["moe_intermediate_size"]
    cfg["decoder_sparse_step"] = 1
    cfg["mlp_only_layers"] = dense_layers(meta, cfg["num_hidden_layers"])
    cfg["norm_topk_prob"] = norm_topk(meta, topk_norm)


def _gguf_qwen2_moe_config(meta, cfg: dict) -> None:
    _gguf_moe_config(meta, cfg, topk_norm=False)  # llama.cpp's qwen2moe never renormalises the top-k weights
    cfg["shared_expert_intermediate_size"] = required_int(meta, "expert_shared_feed_forward_length")
    cfg["qkv_bias"] = "blk.0.attn_q.bias" in meta.tensor_names


register_gguf(GGUFArch("qwen2moe", "Qwen2MoeForCausalLM", "qwen2_moe", {**_GGUF_BLOCK, **_GGUF_SHARED},
                       config=_gguf_qwen2_moe_config, moe=True, one_row_matrices=frozenset({"ffn_gate_inp_shexp"})))
register_gguf(GGUFArch("qwen3moe", "Qwen3MoeForCausalLM", "qwen3_moe", {**_GGUF_BLOCK, **QK_NORM},
                       config=lambda meta, cfg: _gguf_moe_config(meta, cfg, topk_norm=True), moe=True))
