"""MoE metadata of a GGUF file, read the way llama.cpp reads it, for the families' `GGUFArch.config` hooks
(exllamav2/architectures/mixtral.py, qwen_moe.py): expert counts, the expert width, the blocks without experts
and whether the top-k routing weights are renormalised."""

import re

ROUTER = "ffn_gate_inp"  # llama.cpp's router tensor: a block that has one routes its MLP through experts


def expert_counts(meta) -> tuple[int, int]:
    """(<arch>.expert_count, <arch>.expert_used_count), both required, with 0 < used <= count."""
    count = meta.uniform_int(f"{meta.arch}.expert_count")
    used = meta.uniform_int(f"{meta.arch}.expert_used_count")
    for key, value in ((f"{meta.arch}.expert_count", count), (f"{meta.arch}.expert_used_count", used)):
        if value is None:
            raise meta.error(f"required GGUF metadata field '{key}' is missing (an MoE model needs it)")
    if not 0 < used <= count:
        raise meta.error(f"'{meta.arch}.expert_used_count' is {used}, expected 1..{meta.arch}.expert_count ({count})")
    return count, used


def required_int(meta, name: str) -> int:
    """<arch>.<name> as an int (the same in every layer); a missing field is an error naming it."""
    value = meta.uniform_int(f"{meta.arch}.{name}")
    if value is None:
        raise meta.error(f"required GGUF metadata field '{meta.arch}.{name}' is missing")
    return value


def dense_layers(meta, num_layers: int) -> list[int]:
    """The blocks with no router tensor: their MLP is dense (HF's mlp_only_layers)."""
    routed = {int(m.group(1)) for name in meta.tensor_names
              if (m := re.fullmatch(rf"blk\.(\d+)\.{ROUTER}\.weight", name))}
    return [i for i in range(num_layers) if i not in routed]


def norm_topk(meta, default: bool) -> bool:
    """<arch>.expert_weights_norm when the file has it, else `default` (llama.cpp's fixed choice for the family)."""
    value = meta.get(f"{meta.arch}.expert_weights_norm")
    return default if value is None else bool(value)
