"""Write a GGUF model out as an HF transformers folder (config, generation config, safetensors)."""

import json
import os
import warnings

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .reader import GGUFFile

SHARD_BYTES = 2 * 1024**3
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _generation_config(gguf: GGUFFile, cfg: dict) -> dict:
    gen: dict = {"_from_model_config": True}
    for key in ("bos_token_id", "pad_token_id"):
        if key in cfg:
            gen[key] = cfg[key]
    # End-of-turn tokens stop generation too (e.g. Gemma's <end_of_turn>).
    eos = [cfg["eos_token_id"]] if "eos_token_id" in cfg else []
    for extra in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = gguf.metadata(extra)
        if token_id is not None and int(token_id) not in eos:
            eos.append(int(token_id))
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def _plan_shards(gguf: GGUFFile, keys: list[str], element_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        n = element_size
        for d in gguf.shape(key):
            n *= d
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _write_tokenizer(gguf: GGUFFile, out_dir: str) -> bool:
    from ..tokenizer.gguf_tokenizer import save_hf_tokenizer_files, tokenizer_from_gguf
    if gguf.metadata("tokenizer.ggml.tokens") is None:
        warnings.warn(f"{gguf.path}: the file has no tokenizer vocabulary; the folder has weights and config only")
        return False
    save_hf_tokenizer_files(tokenizer_from_gguf(gguf.path), out_dir)
    return True


def convert_gguf_to_hf(gguf_path: str | os.PathLike | GGUFFile, out_dir: str | os.PathLike,
                       dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> str:
    """Dequantise a GGUF file into an HF model folder: config.json, generation_config.json,
    model.safetensors (sharded with an index above 2 GiB) and, when exllamav2.tokenizer.gguf_vocab is
    available, the tokenizer files. `gguf_path` may also be an open GGUFFile. Returns out_dir."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"convert_gguf_to_hf: dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    gguf = gguf_path if isinstance(gguf_path, GGUFFile) else GGUFFile(gguf_path)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    cfg = gguf.hf_config()
    cfg["torch_dtype"] = _DTYPE_NAMES[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(_generation_config(gguf, cfg), f, indent=2)

    keys = gguf.keys()
    shards = _plan_shards(gguf, keys, torch.empty(0, dtype=dtype).element_size())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total_bytes = 0
    with tqdm(total=len(keys), desc=f"Converting {os.path.basename(gguf.path)}", unit="tensor",
              disable=not progress) as bar:
        for name, shard in zip(names, shards):
            tensors = {}
            for key in shard:
                tensors[key] = gguf.get_tensor(key, dtype=dtype).contiguous()
                total_bytes += tensors[key].nbytes
                weight_map[key] = name
                bar.update(1)
            save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
            del tensors
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)

    _write_tokenizer(gguf, out_dir)
    return out_dir
