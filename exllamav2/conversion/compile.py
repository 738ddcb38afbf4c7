"""Writing the output model folder (survey §4.9, §5.6): quantized linears, the other tensors copied as fp16
(bf16 kept), shards, config.json with quantization_config, and the tokenizer/generation files."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

# Files that describe the model but are not weights: copied unchanged (config.json is rewritten).
_COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
_SKIP_FILES = {"config.json", "job.json"}


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.bfloat16):
        return t.to(torch.float16)
    return t


def write_shards(tensors: dict[str, torch.Tensor], out_dir: str, shard_mb: int) -> list[str]:
    """output.safetensors, or output-0000i-of-0000N.safetensors with at most shard_mb MB each (0: one file)."""
    limit = shard_mb * 1024**2 if shard_mb > 0 else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    names = (["output.safetensors"] if len(shards) == 1 else
             [f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name in os.listdir(out_dir):
        if name.startswith("output") and name.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, name))
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name))
    return names


def copy_model_files(in_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in sorted(os.listdir(in_dir)):
        src = os.path.join(in_dir, name)
        if (not os.path.isfile(src) or name in _SKIP_FILES or name.endswith(".index.json")
                or not name.endswith(_COPY_SUFFIXES)):
            continue
        shutil.copyfile(src, os.path.join(out_dir, name))
        copied.append(name)
    return copied


def write_config(in_dir: str, out_dir: str, quantization_config: dict, untie_head: bool) -> None:
    path = os.path.join(in_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if untie_head:
        cfg["tie_word_embeddings"] = False
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
