"""Paged decode attention: the Triton kernel (exllamav2/ops/triton/attention.py) beside the torch reference
(ops/torch_ref/attention.py, one SDPA per sequence over its gathered pages) and a dense batched SDPA over
contiguous K/V (what a kernel that needs no pages could reach), at batch 1/32/128 and context 512/4096.
Also one prompt's prefill: our flash kernel against torch SDPA (the EXLLAMAV2_TRITON_PREFILL switch).

Every timed kernel is first checked against the reference. Attained bandwidth counts the K/V bytes each decode
step must read (batch x context x kv_heads x head_dim x 2 tensors x element size).

    python bench/gpu/bench_attention.py            # on a CUDA GPU, about a minute on an H200
    python bench/gpu/bench_attention.py --cpu      # Triton's interpreter on tiny shapes: checks the script runs

Downloads nothing; random data only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from graph_timing import median_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run under Triton's interpreter on CPU tensors, tiny shapes")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32,128; --cpu 1,2)")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths (default 512,4096; --cpu 40,300)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32; --cpu 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 8; --cpu 2)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128; --cpu 32)")
    p.add_argument("--page-size", type=int, default=None, help="tokens per page (default 256; --cpu 16)")
    p.add_argument("--prefill", type=int, default=None, help="prompt length of the prefill row (default 2048; "
                                                             "--cpu 48; 0 skips it)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50; --cpu 1)")
    return p.parse_args(argv)


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are decorated for the interpreter
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F

    from exllamav2 import ops
    from exllamav2.attn_params import PagedParams
    from exllamav2.ops.torch_ref import attention as ref

    cpu = args.cpu
    t_start = time.perf_counter()
    if not cpu and not torch.cuda.is_available():
        sys.exit("bench_attention: no CUDA device; use --cpu for the interpreter run")
    dev = "cpu" if cpu else "cuda"
    batches = _ints(args.batches or ("1,2" if cpu else "1,32,128"))
    contexts = _ints(args.contexts or ("40,300" if cpu else "512,4096"))
    hq, hk = args.heads or (4 if cpu else 32), args.kv_heads or (2 if cpu else 8)
    d = args.head_dim or (32 if cpu else 128)
    page = args.page_size or (16 if cpu else 256)
    reps = args.reps or (1 if cpu else 50)
    prefill = args.prefill if args.prefill is not None else (48 if cpu else 2048)
    dtype = torch.float16
    esize = 2
    scale = d ** -0.5

    def timed(fn):
        return median_seconds(fn, reps, cpu, capture="try")

    def call(backend, op, *a):
        with ops.use_backend(backend):
            return op(*a)

    def impl(backend, op):
        """The backend's function itself: no dispatch in the timed call."""
        return op.impls[backend].fn

    where = "Triton interpreter on the CPU (figures are not kernel speeds)" if cpu else torch.cuda.get_device_name()
    print(f"paged decode attention, {where}: {hq} query / {hk} KV heads, head dim {d}, fp16, pages of {page}")
    print(f"{'batch':>5} {'context':>7} | {'triton ms':>9} {'GB/s':>7} | {'torch ref ms':>12} {'x':>6} | "
          f"{'dense SDPA ms':>13} {'GB/s':>7}")
    g = torch.Generator().manual_seed(0)  # page permutations
    gd = torch.Generator(device=dev).manual_seed(0)  # data, drawn on the device

    def rand(*shape):
        return torch.randn(*shape, generator=gd, device=dev, dtype=dtype)

    for B in batches:
        for ctx in contexts:
            n_pages = B * -(-ctx // page) + 1
            perm = torch.randperm(n_pages, generator=g).tolist()
            per = -(-ctx // page)
            tables = [perm[i * per:(i + 1) * per] for i in range(B)]
            params = PagedParams(tables, [ctx - 1] * B, [1] * B, page, device=dev)
            kp, vp = rand(1, n_pages * page, hk, d), rand(1, n_pages * page, hk, d)  # page-major (cache.py)
            q, k, v = rand(1, B, hq, d), rand(1, B, hk, d), rand(1, B, hk, d)
            args_ = (q, k, v, kp, vp, params, 0, scale, 0.0)
            got = call("triton", ops.paged_attention, *args_)
            expect = call("torch", ops.paged_attention, *args_)
            err = (got.float() - expect.float()).abs().max().item()
            if err > 1e-2:
                sys.exit(f"bench_attention: triton differs from the reference by {err} at batch {B}, context {ctx}")
            tri, tref = impl("triton", ops.paged_attention), impl("torch", ops.paged_attention)
            t_tri, m_tri = timed(lambda: tri(*args_))
            t_ref, m_ref = timed(lambda: tref(*args_))
            # dense: every sequence's keys contiguous, one batched SDPA (GQA through enable_gqa, no copies)
            kd, vd = rand(B, hk, ctx, d), rand(B, hk, ctx, d)
            qd = q[0].unsqueeze(2)  # (B, hq, 1, d)
            t_sdpa, m_sdpa = timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True))
            kv_bytes = B * ctx * hk * d * 2 * esize
            del kd, vd
            print(f"{B:>5} {ctx:>7} | {t_tri * 1e3:>8.3f}{m_tri:1} {kv_bytes / t_tri / 1e9:>7.1f} | "
                  f"{t_ref * 1e3:>11.3f}{m_ref:1} {t_ref / t_tri:>5.1f}x | {t_sdpa * 1e3:>12.3f}{m_sdpa:1} "
                  f"{kv_bytes / t_sdpa / 1e9:>7.1f}")

    if prefill:
        q, k, v = rand(1, hq, prefill, d), rand(1, hk, prefill, d), rand(1, hk, prefill, d)
        a = (q, k, v, None, scale, 0.0, True)
        err = (call("triton", ops.attention, *a).float() - ref.attention(*a).float()).abs().max().item()
        if err > 1e-2:
            sys.exit(f"bench_attention: triton prefill differs from the reference by {err}")
        tri = impl("triton", ops.attention)
        t_tri, _ = timed(lambda: tri(*a))
        t_sdpa, _ = timed(lambda: ref.attention(*a))
        flops = 4 * hq * d * prefill * prefill / 2  # causal: half the score matrix
        print(f"prefill {prefill} tokens, causal: triton flash {t_tri * 1e3:.3f} ms ({flops / t_tri / 1e12:.1f} "
              f"TFLOP/s), torch SDPA {t_sdpa * 1e3:.3f} ms ({flops / t_sdpa / 1e12:.1f} TFLOP/s) "
              f"-> EXLLAMAV2_TRITON_PREFILL={'triton' if t_tri <= t_sdpa else 'sdpa'} is faster here")
    if not cpu:
        print("times are CUDA-graph replays; * = timed eagerly (could not be captured), host overhead included")
    print(f"bench_attention: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
