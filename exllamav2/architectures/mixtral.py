"""Mixtral: Llama attention with a sparse MoE MLP (softmax router, top-k renormalised, SiLU-gated experts)."""

from ..architecture import ArchParams, default_keys, register

MIXTRAL = ArchParams(
    family="mixtral",
    is_moe=True,
    swa=True,  # HF Mixtral honours config.sliding_window on every layer
    keys={
        **default_keys(),
        "mlp_expert_gate": ".block_sparse_moe.gate",
        "moe_w1": ".block_sparse_moe.experts.*.w1",
        "moe_w3": ".block_sparse_moe.experts.*.w3",
        "moe_w2": ".block_sparse_moe.experts.*.w2",
        "moe_fused_experts": ".mlp.experts",  # HF 5.x in-memory layout (gate_up_proj / down_proj 3-D tensors)
    },
)

register("MixtralForCausalLM", MIXTRAL, notes="MoE: top-k softmax routing renormalised; sliding window honoured; LoRA not applied to experts")
