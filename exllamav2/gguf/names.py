"""GGUF tensor names → HF transformers names, per GGUF architecture."""

import re

from .errors import GGUFError

# Names outside the repeating blocks.
_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_QK_NORM = {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}

_LLAMA_BLOCK = {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"}

# Gemma 3 has four norms per layer; llama.cpp's "ffn_norm" is HF's pre-feedforward norm there.
_GEMMA3_BLOCK = {
    **_BLOCK_COMMON,
    **_QK_NORM,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

BLOCK_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_BLOCK,
    "qwen2": _LLAMA_BLOCK,
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORM},
    "gemma3": _GEMMA3_BLOCK,
}

# Tensors llama.cpp stores that have no HF counterpart (HF derives them from config.json).
SKIPPED_TENSORS = {"rope_freqs.weight"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def hf_tensor_name(arch: str, gguf_name: str) -> str | None:
    """The HF name for a GGUF tensor name, or None when the name is unknown for this architecture."""
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, kind = m.groups()
        hf_part = BLOCK_NAMES[arch].get(part)
        return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"
    if m := _TOP_RE.match(gguf_name):
        part, kind = m.groups()
        hf_part = _TOP_LEVEL.get(part)
        return None if hf_part is None else f"{hf_part}.{kind}"
    return None


def map_tensor_names(path: str, arch: str, gguf_names: list[str]) -> dict[str, str]:
    """{hf_name: gguf_name} for every tensor in the file; unknown names raise one error listing them all."""
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for name in gguf_names:
        if name in SKIPPED_TENSORS:
            continue
        hf_name = hf_tensor_name(arch, name)
        if hf_name is None:
            unknown.append(name)
        else:
            mapping[hf_name] = name
    if unknown:
        raise GGUFError(
            f"{path}: {len(unknown)} tensor name(s) unknown for GGUF architecture '{arch}': {', '.join(unknown)}"
        )
    return mapping
