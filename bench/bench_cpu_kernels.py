"""Micro-benchmark of the cpu backend's GEMV kernels (exllamav2/ops/cpu/csrc/) over one SmolLM2-135M decode step's
weights (30 layers of qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, and the 49152x576 head: ~76-270
MB, far more than the caches), against a plain read of as many bytes.

    python bench/bench_cpu_kernels.py [--threads 1] [--rows 1] [--kinds Q4_0,Q4_1,Q8_0,Q4_K,BF16,...] [--reps 9]
    python bench/bench_cpu_kernels.py --prefill MODEL.gguf [--tokens 512] [--threads 2] [--reps 5]

--prefill: the whole model instead (ExLlamaV2Config, max_seq_len 1024): model.forward(ids (1, tokens), cache,
last_id_only=True) from an empty cache, CPU time per forward divided by the threads, and tokens per CPU second.

Made for a shared machine: times are CPU time of this process divided by the threads (time.process_time), so
another process taking the cores away does not count (it still competes for memory bandwidth: compare rows of
one run, and each kernel with the read line). Reports median ms per step and the weight bytes per CPU second, and
beside them the fastest wall-clock step: with more than one thread the CPU time also counts the threads' spinning
at OpenMP's barriers (2 threads, Q4_0: 25.5 GB/s by CPU time where the wall clock read ~41), so read the wall
columns there, on a quiet machine.
Random codes and scales: the kernels' speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]

def random_matrix(kind: str, n: int, k: int, rng):
    """Random codes and scales of any GGUF type the kernels take (256-column types round k up)."""
    from exllamav2.ops.cpu.gguf_pack import pack_gguf_blocks
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY, F16_FIELDS, set_block_d
    if kind == "BF16":
        return torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    per, bb = BLOCK_GEOMETRY[kind]
    k = -(-k // per) * per
    raw = rng.integers(0, 256, (n, k // per, bb), dtype=np.uint8)
    _, m_at = F16_FIELDS[kind]
    set_block_d(kind, raw, np.full(raw.shape[:2], 0.01 if per == 32 else 0.001))
    if m_at is not None:
        raw[..., m_at:m_at + 2] = np.frombuffer(np.float16(-0.05 if per == 32 else 0.002).tobytes(), np.uint8)
    return pack_gguf_blocks(kind, raw.reshape(n, -1), (n, k))


def timed(fn, reps: int) -> tuple[list[float], list[float]]:
    """(CPU seconds per call divided by the threads, wall seconds per call), one of each per repetition."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        t0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append((time.process_time() - t0) / torch.get_num_threads())
    return cpu, wall


def cpu_seconds(fn, reps: int) -> list[float]:
    return timed(fn, reps)[0]


def prefill(args) -> int:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    torch.set_num_threads(args.threads)
    cfg = ExLlamaV2Config(args.prefill)
    cfg.max_seq_len = 1024
    model = ExLlamaV2(cfg)
    model.load(progress=False)
    cache = ExLlamaV2Cache(model, max_seq_len=1024)
    ids = torch.randint(100, cfg.vocab_size - 100, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def forward():
        cache.current_seq_len = 0
        with torch.inference_mode():
            model.forward(ids, cache, last_id_only=True)
    times = cpu_seconds(forward, args.reps)
    t = statistics.median(times)
    print(f"prefill {args.tokens} tokens, {args.threads} thread(s): CPU s per forward (/threads) median {t:.3f} "
          f"(min {min(times):.3f}, max {max(times):.3f} of {args.reps}) -> {args.tokens / t:.0f} tok/s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="activation rows per call (1 = decode at batch 1)")
    p.add_argument("--kinds", default="Q4_0,Q4_1,Q8_0,Q4_K,BF16",
                   help="any of BF16 and the GGUF types the kernels take (Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, "
                        "Q5_K, Q6_K, Q8_0, IQ4_NL, IQ4_XS)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--prefill", metavar="MODEL.gguf", help="time a prefill of the whole model instead")
    p.add_argument("--tokens", type=int, default=512, help="prompt length for --prefill")
    args = p.parse_args(argv)
    if args.prefill:
        return prefill(args)
    from exllamav2.ops.cpu import kernels
    if not kernels.ready():
        print("error: the CPU kernels are not available here (see the line above)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, rows {args.rows}, isa {kernels.isa()}; CPU ms per step (median of {args.reps}), "
          f"wall ms (fastest of {args.reps})")
    print("| kernel | MB per step | CPU ms | GB/s (CPU) | wall ms (min) | GB/s (wall) |")
    print("|---|---|---|---|---|---|")

    def row(name: str, nbytes: int, fn) -> None:
        cpu, wall = timed(fn, args.reps)
        t, w = statistics.median(cpu), min(wall)
        print(f"| {name} | {nbytes / 1e6:.1f} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {w * 1e3:.2f} | "
              f"{nbytes / w / 1e9:.1f} |")
    big = torch.ones(128 << 20)  # 512 MiB
    row("read (torch.sum, 512 MiB)", big.numel() * 4, lambda: big.sum())
    del big
    for kind in args.kinds.split(","):
        mats = [random_matrix(kind, n, k, rng) for n, k in SHAPES]
        nbytes = sum(m.numel() * 2 if kind == "BF16" else m.nbytes() for m in mats)
        xs = {}
        for m in mats:
            k = m.shape[1] if kind == "BF16" else m.in_features
            xs.setdefault(k, torch.randn(args.rows, k, dtype=torch.bfloat16))

        def step():
            for m in mats:
                if kind == "BF16":
                    kernels.bf16_gemv(xs[m.shape[1]], m)
                else:
                    kernels.gguf_gemv(xs[m.in_features], m)
        row(f"{kind} GEMV", nbytes, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
