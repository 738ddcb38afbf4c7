"""Micro-benchmark of the cpu backend's attention kernel (exllamav2/ops/cpu/csrc/attention.cpp) against the
reference the backend would run without it (exllamav2/ops/torch_ref/attention.py: torch's SDPA), on the shapes a
decode step passes: q (b, hq, rows, d), k/v (b, hk, L, d) as transposed views of a (b, max_len, hk, d) cache.

    python bench/bench_cpu_attention.py [--model smollm2|llama8b] [--rows 1] [--batch 1] [--dtype bf16]
                                        [--threads 1,2] [--lengths 16,64,256,1024,4096]
    python bench/bench_cpu_attention.py --prefill [--lengths 128,512,2048] [--calls 20]

--prefill: a whole prompt of L tokens attending to itself (rows = L, causal), as a prefill from an empty cache.

With --paged PAGE_SIZE: the decode-only paged step's attention instead, --batch sequences of L keys each over a
page-major cache (slots, hk, d), their pages scattered: the C++ op `exllamav2_cpu::paged_decode_attention` against
the Python custom op it replaces in the compiled paged step (`exllamav2::paged_decode_attention`,
ops/torch_ref/attention.py: block tables read on the host, then the decode kernel per sequence).

Made for a shared machine: each call is timed alone (wall microseconds), and the table gives the minimum (the call
least disturbed by other processes) and the median over --calls calls. Also printed: the kernel's rate at its
minimum in GMAC/s (2 * b * hq * rows * L * d multiply-adds: scores and weighted sum; a prefill counts the
causal half, 2 * b * hq * L * (L + 1) / 2 * d).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

MODELS = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128), "gemma2": (8, 4, 256)}  # (hq, hk, head_dim)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def per_call_us(fn, calls: int) -> tuple[float, float]:
    """(minimum, median) wall microseconds over `calls` calls timed one by one: on a shared machine a call that
    another process interrupts (or that waits for a descheduled worker thread) only moves the upper tail."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6, statistics.median(times) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--rows", type=int, default=1, help="query rows per sequence (1 = decode)")
    p.add_argument("--prefill", action="store_true", help="rows = L: a whole prompt, causal")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--lengths", default="16,64,256,512,1024,2048,4096")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--paged", type=int, default=0, metavar="PAGE_SIZE", help="time the paged decode op instead")
    args = p.parse_args(argv)
    from exllamav2.ops.cpu import kernels
    from exllamav2.ops.torch_ref.attention import attention as reference
    if not (kernels.ready() and kernels.isa() == "avx512"):
        print("the decode-attention kernel needs the CPU kernels built and AVX-512", file=sys.stderr)
        return 1
    hq, hk, d = MODELS[args.model]
    dtype, s, b = DTYPES[args.dtype], args.rows, args.batch
    if args.paged:
        return paged_table(args, hq, hk, d, dtype, b)
    kernel = torch.ops.exllamav2_cpu.decode_attention
    print(f"# {args.model}: q ({b}, {hq}, {s}, {d}) {args.dtype}, k/v ({b}, {hk}, L, {d}) cache views; "
          f"us per call, min (median) of {args.calls}; causal when rows > 1" if not args.prefill else
          f"# {args.model}: prefill, q ({b}, {hq}, L, {d}) {args.dtype} over its own L keys, causal; us per call, min "
          f"(median) of {args.calls}")
    print("| threads | L | kernel us | SDPA us | SDPA / kernel (min) | kernel GMAC/s |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        for L in (int(x) for x in args.lengths.split(",")):
            s = L if args.prefill else args.rows
            q = torch.randn(b, s, hq, d, generator=g).to(dtype).transpose(1, 2)
            kc = torch.randn(b, L + 64, hk, d, generator=g).to(dtype)
            vc = torch.randn(b, L + 64, hk, d, generator=g).to(dtype)
            k, v = kc[:, :L].transpose(1, 2), vc[:, :L].transpose(1, 2)
            causal = s > 1
            ours = per_call_us(lambda: kernel(q, k, v, None, d ** -0.5, 0.0, causal), args.calls)
            ref = per_call_us(lambda: reference(q, k, v, None, d ** -0.5, 0.0, causal), args.calls)
            pairs = L * (L + 1) // 2 if args.prefill else s * L
            gmac = 2 * b * hq * pairs * d / (ours[0] * 1e3)
            print(f"| {threads} | {L} | {ours[0]:.1f} ({ours[1]:.1f}) | {ref[0]:.1f} ({ref[1]:.1f}) | "
                  f"{ref[0] / ours[0]:.2f}x | {gmac:.1f} |", flush=True)
    return 0


def paged_table(args, hq: int, hk: int, d: int, dtype: torch.dtype, b: int) -> int:
    """The --paged table: both ops on the same scattered block tables, one new token per sequence."""
    ps = args.paged
    kernel, python_op = torch.ops.exllamav2_cpu.paged_decode_attention, torch.ops.exllamav2.paged_decode_attention
    print(f"# {args.model}: {b} sequence(s) of L keys, q ({b}, {hq}, {d}) {args.dtype}, pages of {ps} scattered; us "
          f"per call, min (median) of {args.calls}")
    print("| threads | L | C++ op us | Python op us | Python / C++ (min) |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        for L in (int(x) for x in args.lengths.split(",")):
            need = -(-L // ps)
            pages = torch.randperm(b * need + 1, generator=g)
            block_index = pages[:b * need].view(b, need)
            kflat = torch.randn((b * need + 1) * ps, hk, d, generator=g).to(dtype)
            vflat = torch.randn((b * need + 1) * ps, hk, d, generator=g).to(dtype)
            q = torch.randn(b, hq, d, generator=g).to(dtype)
            lens = torch.full((b,), L, dtype=torch.long)
            call = (q, kflat, vflat, block_index, lens, ps, 0, d ** -0.5, 0.0)
            ours = per_call_us(lambda: kernel(*call), args.calls)
            ref = per_call_us(lambda: python_op(*call), args.calls)
            print(f"| {threads} | {L} | {ours[0]:.1f} ({ours[1]:.1f}) | {ref[0]:.1f} ({ref[1]:.1f}) | "
                  f"{ref[0] / ours[0]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
