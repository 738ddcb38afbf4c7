"""`python -m exllamav2 convert-gguf FILE OUT_DIR`: write a GGUF model as an HF folder (config.json,
generation_config.json, tokenizer.json, safetensors) that this engine and HF transformers both load."""

from __future__ import annotations

import argparse

NAME = "convert-gguf"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="convert a GGUF file into an HF model folder",
                              description=__doc__.split(":", 1)[1].strip())
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output folder (created)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default: bfloat16)")
    return p


def run(args) -> int:
    import torch

    from ..gguf import convert_gguf_to_hf
    out = convert_gguf_to_hf(args.file, args.out_dir, dtype=getattr(torch, args.dtype), progress=True)
    print(f"Wrote {out}")
    return 0
