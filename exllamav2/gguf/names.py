"""GGUF tensor names → HF transformers names. The generic machinery and llama.cpp's common names; each
family's own block table is declared in its file under exllamav2/architectures/ (GGUFArch.block_names)."""

import re

from .errors import GGUFError

# Names outside the repeating blocks (a family may replace them with GGUFArch.top_names).
TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Block names llama.cpp uses the same way in every family; the families build their tables from these.
BLOCK_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

QK_NORM = {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}

# Tensors llama.cpp stores that have no HF counterpart (HF derives them from config.json).
SKIPPED_TENSORS = {"rope_freqs.weight"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")
# llama.cpp's layout before the stacked experts (April 2024; many Mixtral files still in use): one 2-D tensor per
# expert, blk.N.ffn_gate.E.weight; read as expert E of the stacked name's HF entry (`ffn_gate_exps`)
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight$")


def _spec(arch):
    """The GGUFArch for a GGUF architecture name (or the GGUFArch itself)."""
    if not isinstance(arch, str):
        return arch
    from ..architecture import gguf_architectures
    archs = gguf_architectures()
    if arch not in archs:
        raise GGUFError(f"GGUF architecture '{arch}' is not supported (supported: {', '.join(archs)})")
    return archs[arch]


def block_part(gguf_name: str) -> str | None:
    """The block name of a `blk.N.<name>.weight|bias` tensor (e.g. attn_q), else None."""
    m = _BLOCK_RE.match(gguf_name)
    return m.group(2) if m else None


def hf_tensor_name(arch, gguf_name: str) -> str | None:
    """The HF name for a GGUF tensor name, or None when the name is unknown for this architecture.
    `arch` is a GGUF architecture name or its GGUFArch."""
    spec = _spec(arch)
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, kind = m.groups()
        hf_part = spec.block_names.get(part)
        return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"
    if spec.moe and (m := _EXPERT_RE.match(gguf_name)):
        layer, part, expert = m.groups()
        hf_part = spec.block_names.get(part + "_exps")
        return None if hf_part is None else f"model.layers.{layer}.{hf_part.replace('*', expert)}.weight"
    if m := _TOP_RE.match(gguf_name):
        part, kind = m.groups()
        hf_part = (TOP_LEVEL if spec.top_names is None else spec.top_names).get(part)
        return None if hf_part is None else f"{hf_part}.{kind}"
    return None


def map_tensor_names(path: str, arch, gguf_names: list[str]) -> dict[str, str]:
    """{hf_name: gguf_name} for every tensor in the file; unknown names raise one error listing them all. A stacked
    expert tensor's HF name keeps the family's `*` for the expert index (gguf/experts.py splits it per expert)."""
    spec = _spec(arch)
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for name in gguf_names:
        if name in SKIPPED_TENSORS:
            continue
        hf_name = hf_tensor_name(spec, name)
        if hf_name is None:
            unknown.append(name)
        else:
            mapping[hf_name] = name
    if unknown:
        raise GGUFError(
            f"{path}: {len(unknown)} tensor name(s) unknown for GGUF architecture '{spec.name}': {', '.join(unknown)}"
            + _experts_hint(spec, unknown)
        )
    return mapping


def _experts_hint(spec, unknown: list[str]) -> str:
    """Why a file's expert tensors are unknown: read without experts, its metadata gives no expert count."""
    from ..architecture import gguf_architecture
    moe = None if spec.moe else gguf_architecture(spec.name, True)
    if moe is None or not any(block_part(name) in moe.block_names for name in unknown):
        return ""
    return f" (expert tensors: the metadata field '{spec.name}.expert_count' must be > 0 for them)"
