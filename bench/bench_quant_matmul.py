"""Quantized matmul on the CPU: reference (dequantise + matmul every call) vs the paths QuantWeight picks.

Prints one table: shape, format, rows M, reference µs, packed int4 kernel µs, dense bf16 on a kept dequantised copy µs,
and GB/s of stored weight bytes for the packed path; 'picks' is the choice with dense_prefill=True. Run: python bench/bench_quant_matmul.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from exllamav2.quant import gptq_quantize, make_quant_weight
from exllamav2.quant.exl2 import exl2_pack


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e6  # the VM's cores are shared: the minimum is the least disturbed run


def exl2_tensors(n_in: int, out: int, widths: list[tuple[int, float]]) -> dict:
    groups, left = [], n_in
    for i, (b, share) in enumerate(widths):
        rows = left if i == len(widths) - 1 else int(n_in * share) // 32 * 32
        groups += [(b, 32)] * (rows // 32)
        left -= rows
    codes = torch.cat([torch.randint(0, 1 << b, (r, out)) for b, r in groups])
    return exl2_pack(codes, groups, torch.randint(0, 16, (len(groups), out)), (torch.rand(len(groups)) * 0.02).half(),
                     torch.randperm(n_in))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [(576, 1536), (1536, 576), (2048, 2048)] if not args.quick else [(576, 1536)]
    formats = {
        "exl2 4.0": [(4, 1.0)],
        "exl2 [6,4,3]": [(6, 0.1), (4, 0.7), (3, 0.2)],
        "exl2 [8,4]": [(8, 0.25), (4, 0.75)],
        "gptq g128 act": None,
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'out x in':>11} {'format':>14} {'M':>4} {'ref µs':>9} {'int4pack µs':>12} {'dense bf16 µs':>14} {'GB/s':>6} {'picks':>7}")
    for out, n_in in shapes:
        for name, widths in formats.items():
            if widths is None:
                W = torch.randn(out, n_in)
                H = torch.diag(torch.rand(n_in) + 0.1)
                t = gptq_quantize(W, group_size=128, act_order=True, hessian=H) if n_in <= 1536 else gptq_quantize(W, group_size=128)
            else:
                t = exl2_tensors(n_in, out, widths)
            qw = make_quant_weight("bench", t, n_in, out, torch.bfloat16, "cpu")
            stored = qw._stored_bytes()
            dense = qw.dequantize(torch.bfloat16)
            for M in (1, 8, 32, 128, 512):
                if args.quick and M not in (1, 512):
                    continue
                x = torch.randn(M, n_in).bfloat16()
                reps = 20 if M <= 32 else 5
                ref = timeit(lambda: F.linear(x, qw.dequantize(torch.bfloat16)), max(3, reps // 4))
                fast = timeit(lambda: qw.packed.matmul(x), reps) if qw.packed is not None else float("nan")
                dn = timeit(lambda: F.linear(x, dense), reps)
                gbs = stored / (fast * 1e-6) / 1e9 if qw.packed is not None else float("nan")
                qw.dense_prefill = True
                picks = "int4" if qw.uses_packed(x) else "dense"
                print(f"{out:>5}x{n_in:<5} {name:>14} {M:>4} {ref:>9.0f} {fast:>12.0f} {dn:>14.0f} {gbs:>6.1f} {picks:>7}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
