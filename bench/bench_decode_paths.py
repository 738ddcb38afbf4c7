"""The seed-API loop against the dynamic generator in one process, eager and compiled: ms a token (this thread's CPU
time and wall time, the minimum over repetitions) and minor page faults a token, optionally at every caller stack
depth up to --scan (what exllamav2/runtime/stack_chunk.py is about; bench/README_PERF.md "Session 10").

    python bench/bench_decode_paths.py                    # SmolLM2-135M-Instruct Q4_1, 2 threads, 4 repetitions
    python bench/bench_decode_paths.py --scan 150         # faults a token at each caller depth 0..149
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_engines import make_inputs  # noqa: E402
from bench_llamacpp import Ours  # noqa: E402


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def at_depth(d: int, fn):
    return fn() if d == 0 else at_depth(d - 1, fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--scan", type=int, default=0, help="also measure at caller stack depths 0..SCAN-1")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from exllamav2.default_models import smollm2_gguf_path
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob

    ours = Ours(args.model or smollm2_gguf_path(), True, True, 768, 8)
    inp = make_inputs(ours.tokenizer, ours.model.config.vocab_size, 512, 8)
    gen = ours.generator.gen

    def seed(row, n):
        row.activate()
        tok = row.start(inp.ids8).argmax(-1, keepdim=True)
        c0, w0, f0 = time.thread_time(), time.perf_counter(), faults()
        for _ in range(n):
            tok = row.step(tok).argmax(-1, keepdim=True)
        return (time.thread_time() - c0) / n * 1e3, (time.perf_counter() - w0) / n * 1e3, (faults() - f0) / n

    def dynamic(n, compiled):
        ours.generator.activate()
        if not compiled:
            ours.model.decode_runner = None
        gen.reset_page_table()
        gen.enqueue(ExLlamaV2DynamicJob(inp.ids8, n + 1, gen_settings=ours.generator.greedy, stop_conditions=[]))
        start, count = None, 0
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r["stage"] == "streaming" and r["token_ids"].shape[-1]:
                    if start is None:  # from the first decoded token on
                        start = time.thread_time(), time.perf_counter(), faults()
                    else:
                        count += r["token_ids"].shape[-1]
        c0, w0, f0 = start
        return (time.thread_time() - c0) / count * 1e3, (time.perf_counter() - w0) / count * 1e3, \
            (faults() - f0) / count

    paths = {"loop eager": lambda n: seed(ours.rows["eager"], n),
             "dynamic eager": lambda n: dynamic(n, False),
             "loop compiled": lambda n: seed(ours.rows["compiled"], n),
             "dynamic compiled": lambda n: dynamic(n, True)}
    for f in paths.values():
        f(8)  # warm: compiles the paged step
    if args.scan:
        print("depth | " + " | ".join(f"{k} ms, faults" for k in paths))
        for d in range(args.scan):
            row = [at_depth(d, lambda: f(16)) for f in paths.values()]
            print(f"{d} | " + " | ".join(f"{w:.2f}, {fl:.0f}" for _, w, fl in row), flush=True)
    res = {k: [] for k in paths}
    for _ in range(args.reps):
        for k, f in paths.items():
            res[k].append(f(args.tokens))
    print(f"{args.threads} threads, {args.tokens} tokens, min of {args.reps} interleaved repetitions")
    print("| path | CPU ms/token | wall ms/token | faults/token |\n|---|---|---|---|")
    best = {k: (min(c for c, _, _ in v), min(w for _, w, _ in v), min(f for _, _, f in v)) for k, v in res.items()}
    for k, (c, w, f) in best.items():
        print(f"| {k} | {c:.2f} | {w:.2f} | {f:.1f} |")
    for mode in ("eager", "compiled"):
        print(f"dynamic generator vs the loop, {mode}: {best[f'loop {mode}'][1] / best[f'dynamic {mode}'][1]:.2f}x "
              "(wall time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
