"""`exllamav2 bench`: decode/prefill speed of the fast CPU path beside HF transformers and llama.cpp."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="CPU speed: our fast path vs HF transformers and llama.cpp",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf file (default: SmolLM2-135M GGUF)")
    p.add_argument("--weights", default="bf16,auto",
                   help="comma-separated fast-path weight kinds: bf16, int8, int4, auto (the GGUF's own blocks)")
    p.add_argument("--compile", action="store_true", help="also run the compiled decode step (slow first time)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--threads", type=int, default=None, help="torch/llama.cpp threads (default: usable cores)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens per decode measurement")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched decode measurement")


def run(args) -> int:
    import sys

    from ..fast.benchmark import format_table, run_benchmark
    path = args.model
    if path is None:
        from ..default_models import smollm2_gguf_path
        path = smollm2_gguf_path()
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    report = run_benchmark(path, weights=weights, compile=args.compile, hf=not args.no_hf,
                           llamacpp=not args.no_llamacpp, threads=args.threads, reps=args.reps,
                           new_tokens=args.tokens, prefill_len=args.prefill, batch=args.batch, log=log)
    print(f"model: {path}")
    print(format_table(report))
    return 0
