"""`python -m exllamav2 info`: what a model is (architecture, size, dtype, format, per-module weights), or with
--architectures the architectures this engine supports."""

from __future__ import annotations

import argparse
import importlib.util
import os

from . import add_model_args, load_model, model_path

NAME = "info"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="describe a model, or list supported architectures",
                              description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--architectures", action="store_true", help="list the supported architectures and exit")
    p.add_argument("--no-modules", action="store_true", help="leave out the per-module table")
    add_model_args(p, max_seq_len=None)
    return p


def print_architectures() -> None:
    if importlib.util.find_spec("exllamav2.architectures.table") is not None:
        from exllamav2.architectures.table import architecture_table
        table = architecture_table()
        print(table if isinstance(table, str) else "\n".join(map(str, table)))
        return
    from exllamav2.architecture import supported_architectures
    archs = supported_architectures()
    width = max(len(a) for a in archs)
    for name, entry in sorted(archs.items()):
        notes = getattr(entry, "notes", "") or ""
        print(f"{name:<{width}}  {notes}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def gguf_tensor_types(path: str) -> str:
    from collections import Counter

    from ..gguf.header import read_header
    counts = Counter(t.tensor_type.name for t in read_header(path).tensors)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def module_format(module) -> str:
    subs = getattr(module, "submodules", None) or [module]
    handles = [getattr(s, "q_handle", None) for s in subs]
    described = []
    for h in handles:
        if h is not None and hasattr(h, "describe"):
            try:
                described.append(h.describe())
            except NotImplementedError:
                described.append(type(h).__name__)
    if described:
        return "; ".join(dict.fromkeys(described))
    table = getattr(module, "table", None)   # a GGUF token embedding kept in its blocks
    if table is not None and hasattr(table, "qtype"):
        return f"GGUF {table.qtype}, rows dequantized on lookup"
    return "quantized" if module.is_quant() else str(getattr(module, "dtype", "")).replace("torch.", "")


def run(args) -> int:
    if args.architectures:
        print_architectures()
        return 0
    config, model, _, tokenizer = load_model(args, need_cache=False)
    path = model_path(args)
    gguf_path = getattr(config, "gguf_path", None)
    if gguf_path:
        from ..quant.gguf_blocks import PACKED_TYPES
        fmt = ("GGUF (dequantized on load)" if config.gguf_dequantize else
               f"GGUF ({'/'.join(PACKED_TYPES)} linears and token embeddings kept in their blocks; other types "
               "dequantized on load)")
    else:
        fmt = "quantized" if model.is_quant() else "safetensors"
    print(f"Model:         {os.path.normpath(path)}")
    print(f"Architecture:  {config.architecture}")
    params = model.numel()
    if getattr(config, "tie_word_embeddings", False):
        params -= model.modules[-1].numel()  # the head shares the embedding's weights
    print(f"Parameters:    {human_count(params)}")
    print(f"Dtype:         {str(model.dtype).replace('torch.', '')}")
    print(f"Format:        {fmt}")
    if gguf_path:
        print(f"GGUF tensors:  {gguf_tensor_types(gguf_path)}")
    if model.is_quant() and any(m.device() == "cpu" for m in model.modules[1:]):
        from .. import ops
        mode = ops.cpu_activations()
        print(f"CPU matmuls:   {mode} activations" + (" (two int8 stages; --cpu-activations int8 for llama.cpp's "
                                                      "one stage)" if mode == "int16" else " (one int8 stage)"))
    rotation = config.residual_rotation
    if rotation:
        print(f"Rotation:      residual stream rotated at conversion ({rotation.get('method', '?')}, matrix in "
              f"{rotation.get('file', '?')}); hidden states are in rotated coordinates")
    print(f"Layers:        {config.num_hidden_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}"
          f" (kv {config.num_key_value_heads}), head dim {config.head_dim}, vocab {config.vocab_size}")
    print(f"Context:       {config.max_seq_len} tokens")
    print(f"Tokenizer:     BOS {tokenizer.bos_token_id}, EOS {tokenizer.eos_token_ids}, pad {tokenizer.pad_token_id}")
    total = sum(m.weight_footprint() for m in model.modules)
    print(f"Weights:       {human_bytes(total)} on disk")
    if not args.no_modules:
        print()
        print(f"{'module':<40} {'kind':<22} {'params':>10} {'on disk':>10}  format")
        for m in model.modules:
            print(f"{m.key:<40} {type(m).__name__:<22} {m.numel():>10,} {human_bytes(m.weight_footprint()):>10}  "
                  f"{module_format(m)}")
    return 0
