"""CPU benchmark: the seed API loop (`model.forward` per token), the generators, HF transformers and llama.cpp
on the same GGUF, interleaved in one process; one markdown table of medians.

    python bench/bench_cpu.py [-m MODEL] [--compile] [--threads N] [--reps R] [--tokens N] [--prefill P]
                              [--batch B] [--no-hf] [--no-llamacpp] [--no-generators]

Rows and columns are described in bench/decode_benchmark.py and bench/README_PERF.md ("Session 6: one forward").
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_benchmark import format_table, run_benchmark  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="model folder or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--compile", action="store_true",
                   help="also run compiled rows (model.compile_decode; minutes the first time per model)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--no-generators", action="store_true", help="skip the generator rows")
    p.add_argument("--threads", type=int, default=None, help="torch/llama.cpp threads (default: usable cores)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens per decode measurement")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument("--batch", type=int, default=8, help="rows of the batched decode measurement")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("reps", "tokens", "prefill", "batch"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1", file=sys.stderr)
            return 2
    path = args.model
    if path is None:
        from exllamav2.default_models import smollm2_gguf_path
        path = smollm2_gguf_path()
    elif not os.path.exists(path):
        print(f"error: model not found: {path}", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = run_benchmark(path, compile=args.compile, hf=not args.no_hf, llamacpp=not args.no_llamacpp,
                           generators=not args.no_generators, threads=args.threads, reps=args.reps,
                           new_tokens=args.tokens, prefill_len=args.prefill, batch=args.batch, log=log)
    print(f"model: {path}")
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
