"""The batch-invariant dense GEMM (the C++ GEMV at every row count: csrc/bf16_gemv.cpp, what dense linears run by
default) against torch's own matrix multiply (oneDNN) on the same operands, in one process, the two alternating:
GFLOP/s of each, best of --reps, and their ratio.

    python bench/bench_dense_gemm.py [--dtypes bfloat16,float32] [--shapes 512x576x1536,512x2048x2048,...]
           [--reps 15] [--threads 2]

A shape is M x K x N: M activation rows (a prefill's tokens), K input and N output features. The default shapes are
SmolLM2's MLP (576 -> 1536) and a larger model's (2048 -> 5632, and 5632 -> 2048 for the down projection).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = "512x576x1536,512x2048x2048,512x2048x5632,512x5632x2048"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {item!r} is not M x K x N (e.g. 512x576x1536)")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def measure(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> dict:
    """Best seconds of each path over `reps` alternating calls, and the GFLOP/s that gives."""
    from exllamav2.ops.cpu import kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    paths = {"invariant GEMV": lambda: kernels.dense_gemv(x, w), "oneDNN": lambda: F.linear(x, w)}
    for fn in paths.values():  # warm-up
        fn()
    best = {name: float("inf") for name in paths}
    for _ in range(reps):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    flops = 2.0 * m * k * n
    return {name: flops / s / 1e9 for name, s in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated M x K x N")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from exllamav2.ops.cpu import kernels
    if not kernels.ready():
        raise SystemExit("the C++ CPU kernels are not available here (see README: CPU kernels)")
    dtypes = []
    for name in args.dtypes.split(","):
        dt = getattr(torch, name.strip(), None)
        if dt not in (torch.bfloat16, torch.float16, torch.float32):
            raise SystemExit(f"--dtypes: {name!r} is not one of bfloat16, float16, float32")
        dtypes.append(dt)
    print(f"{torch.get_num_threads()} threads, ISA {kernels.isa()}, best of {args.reps}")
    print(f"{'dtype':<10} {'M x K x N':<18} {'invariant GFLOP/s':>18} {'oneDNN GFLOP/s':>15} {'ratio':>7}")
    for dt in dtypes:
        for m, k, n in parse_shapes(args.shapes):
            r = measure(m, k, n, dt, args.reps)
            inv, ref = r["invariant GEMV"], r["oneDNN"]
            print(f"{str(dt).removeprefix('torch.'):<10} {f'{m}x{k}x{n}':<18} {inv:>18.0f} {ref:>15.0f} "
                  f"{inv / ref:>6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
