"""RoPE plus the K/V cache write on the CPU: the C++ op (exllamav2/ops/cpu/csrc/small_ops.cpp: rope_kv_write) against
the reference it is bit-identical to (exllamav2/ops/torch_ref/rope_kv.py), on one SmolLM2 layer's shapes (9 q + 3 k
heads of 64, 3 v heads).

    python bench/bench_cpu_rope.py [--rows 1,512] [--threads 2] [--calls 50]

Microseconds per call, the minimum over --calls calls timed one by one.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def per_call_us(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args(argv)
    from exllamav2.ops.cpu import kernels
    from exllamav2.ops.torch_ref import rope_kv
    if not kernels.ready():
        print("error: the CPU kernels are not available here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"rope + K/V write, SmolLM2 layer shapes, {args.threads} threads: us per call (min of {args.calls})")
    print("| rows | dtype | C++ op | reference | reference / op |")
    print("|---|---|---|---|---|")
    for s in (int(r) for r in args.rows.split(",")):
        for dt in (torch.bfloat16, torch.float32):
            qk, v = torch.randn(1, s, 12, 64, dtype=dt), torch.randn(1, s, 3, 64, dtype=dt)
            cos, sin = torch.randn(1, s, 1, 64, dtype=dt), torch.randn(1, s, 1, 64, dtype=dt)
            kc, vc = torch.zeros(1, 1024, 3, 64, dtype=dt), torch.zeros(1, 1024, 3, 64, dtype=dt)
            idx = torch.arange(s)
            ours = per_call_us(lambda: torch.ops.exllamav2_cpu.rope_kv_write(qk, v, cos, sin, False, kc, vc, idx, 9),
                               args.calls)
            ref = per_call_us(lambda: rope_kv.rope_kv_write(qk, v, cos, sin, False, kc, vc, idx, 9), args.calls)
            print(f"| {s} | {str(dt).removeprefix('torch.')} | {ours:.1f} | {ref:.1f} | {ref / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
