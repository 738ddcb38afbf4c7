"""act(gate) * up on the CPU: the C++ op (exllamav2/ops/cpu/csrc/small_ops.cpp: gated_activation) against the
reference (exllamav2/ops/torch_ref/activation.py: act, then the product) on the halves of a fused gate|up output,
SmolLM2's intermediate size by default.

    python bench/bench_cpu_gated.py [--rows 1,8,512] [--width 1536] [--act silu] [--threads 2] [--calls 50]

Microseconds per call, the minimum over --calls calls timed one by one (bench_cpu_rope.py's timer).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_cpu_rope import per_call_us


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,512")
    p.add_argument("--width", type=int, default=1536, help="intermediate size (each half of gate|up)")
    p.add_argument("--act", default="silu", help="silu or gelu_pytorch_tanh")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args(argv)
    from exllamav2.ops.cpu import kernels, small_ops
    from exllamav2.ops.torch_ref import activation
    if not kernels.ready() or not kernels.active_avx512():
        print("error: the CPU kernels (AVX-512) are not available here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"act(gate) * up, {args.act}, bf16, width {args.width}, {args.threads} threads (us per call, best of "
          f"{args.calls})")
    print("| rows | reference | kernel | speed-up |")
    print("|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        y = torch.randn(rows, 2 * args.width, generator=torch.Generator().manual_seed(rows)).bfloat16()
        gate, up = y.split([args.width, args.width], dim=-1)
        ref = per_call_us(lambda: activation.gated_activation(gate, up, args.act), args.calls)
        ker = per_call_us(lambda: small_ops.gated_activation(gate, up, args.act), args.calls)
        print(f"| {rows} | {ref:.1f} | {ker:.1f} | {ref / ker:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
