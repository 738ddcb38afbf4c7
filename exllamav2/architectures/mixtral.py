"""Mixtral: Llama attention with a sparse MoE MLP (softmax router, top-k renormalised, SiLU-gated experts).
GGUF: llama.cpp's "llama" with experts (llama.expert_count > 0)."""

from ..architecture import ArchParams, GGUFArch, default_keys, register, register_gguf
from ..gguf.moe import expert_counts, required_int
from ..gguf.names import BLOCK_COMMON

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


# ------------------------------------------------------------------------------------------------ GGUF

# the experts' `*` is the expert index: llama.cpp stacks them in one 3-D tensor (exllamav2/gguf/experts.py)
_GGUF_BLOCK = {
    **{k: v for k, v in BLOCK_COMMON.items() if not k.startswith("ffn_")},
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.*.w1",
    "ffn_up_exps": "block_sparse_moe.experts.*.w3",
    "ffn_down_exps": "block_sparse_moe.experts.*.w2",
}


def _gguf_config(meta, cfg: dict) -> None:
    cfg["num_local_experts"], cfg["num_experts_per_tok"] = expert_counts(meta)
    cfg["intermediate_size"] = required_int(meta, "feed_forward_length")  # every expert's width


# the same conventions as the Llama files (llama.py): q/k rows permuted, head_dim possibly from rope
register_gguf(GGUFArch("llama", "MixtralForCausalLM", "mixtral", _GGUF_BLOCK, permuted_qk=True,
                       head_dim_from_rope=True, config=_gguf_config, moe=True))
