"""MoE experts routed on the device (exllamav2/ops/triton/moe.py) beside the two paths a decode step had before:
the eager grouped path (tokens counted per expert on the host, one matmul per picked expert: what
exllamav2/moe_mlp.py runs outside a graph) and the static path (every expert over every token, masked: what a
captured graph ran). Shapes: a Mixtral-8x7B layer (hidden 4096, 8 experts of 14336, top-2) and a Qwen3-30B-A3B
layer (hidden 2048, 128 experts of 768, top-8), experts with random weights in each format asked for.

Checks first (the run exits 1 if one fails): the kernels against the grouped path; a token's result the same bits
alone as in a batch; a CUDA graph captured once and replayed with other routings giving the eager call's bits.
Then median µs per call for 1, 8, 32 and 128 tokens (CUDA-graph replays; `*`: timed eagerly, it cannot be
captured) and GB/s over the file bytes of the experts the tokens picked. Expert formats: `--formats` (default
fp16 and EXL2 4.0 bpw; bench_linears.py's names and random layouts).

    python bench/gpu/bench_moe.py          # on a CUDA GPU, about a minute
    python bench/gpu/bench_moe.py --cpu    # Triton's interpreter on tiny shapes: checks the script runs

Downloads nothing; random data only.
"""

from __future__ import annotations

import argparse
import os
import sys

from graph_timing import median_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
CPU_SHAPES = {"tiny-8": (64, 96, 8, 2), "tiny-16": (32, 64, 16, 4)}  # widths: multiples of 32 (EXL2 groups)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run under Triton's interpreter on CPU tensors, tiny shapes")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,8,32,128; --cpu 1,5)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30; --cpu 1)")
    p.add_argument("--formats", default="fp16,exl2_4.0", help="comma-separated expert formats, as bench_linears.py "
                                                              "names them (fp16, exl2_<bpw>, gptq_4, gguf_Q4_K)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F

    from bench_linears import make_weight
    from exllamav2 import ops
    from exllamav2.ops.triton import moe as tmoe
    from exllamav2.ops.triton.linear import DenseKernel

    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        sys.exit("bench_moe: no CUDA device; use --cpu for the interpreter run")
    dev = "cpu" if cpu else "cuda"
    tokens = [int(t) for t in (args.tokens or ("1,5" if cpu else "1,8,32,128")).split(",") if t]
    reps = args.reps or (1 if cpu else 30)
    dtype = torch.float16
    failed = []

    def timed(fn, capture=True):
        return median_seconds(fn, reps, cpu, capture)

    where = "Triton interpreter on the CPU (figures are not kernel speeds)" if cpu else torch.cuda.get_device_name()
    print(f"MoE experts, {where}")
    gd = torch.Generator(device=dev).manual_seed(0)
    cases = [(name, shape, fmt) for name, shape in (CPU_SHAPES if cpu else SHAPES).items()
             for fmt in args.formats.split(",") if fmt]
    for name, (H, I, E, k), fmt in cases:
        name = f"{name} {fmt}"
        # each expert's linear as the engine prepares it (bench_linears.make_weight: random codes in the format's
        # real layout), and the bytes its file holds
        k1, k3, k2, nb = [], [], [], []
        for e in range(E):
            made = [make_weight(fmt, out, n_in, dev, seed=1000 * e + j)
                    for j, (out, n_in) in enumerate(((I, H), (I, H), (H, I)))]
            ks = [DenseKernel(w, None) if isinstance(w, torch.Tensor) else ops.prepare_linear(None, None, w, dev, dtype)
                  for w, _ in made]
            for lst, kern in zip((k1, k3, k2), ks):
                lst.append(kern)
            nb.append(sum(b for _, b in made))
        tables = tmoe.expert_tables(*([_Lin(kern) for kern in ks] for ks in (k1, k3, k2)), F.silu, dtype)
        def routing(T, seed):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(T, H, device=dev, dtype=dtype, generator=g)
            logits = torch.randn(T, E, device=dev, generator=g)
            w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            return x, w, ids

        def grouped(x, w, ids):
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=E).tolist()
            y = torch.zeros_like(x)
            beg = 0
            for e, n in enumerate(counts):
                if n:
                    sel = order[beg:beg + n]
                    xe = x.index_select(0, sel // k)
                    a = F.silu(k1[e](xe)) * k3[e](xe)
                    y.index_add_(0, sel // k, (k2[e](a) * w.reshape(-1)[sel, None]).to(x.dtype))
                    beg += n
            return y

        def static(x, w, ids):
            y = torch.zeros_like(x)
            for e in range(E):
                a = F.silu(k1[e](x)) * k3[e](x)
                we = torch.where(ids == e, w, torch.zeros_like(w)).sum(-1, keepdim=True)
                y += (k2[e](a) * we).to(x.dtype)
            return y

        def device(x, w, ids):
            return tmoe.grouped_experts(x, w, ids, tables, F.silu)

        # checks
        x, w, ids = routing(max(tokens), 1)
        got, want = device(x, w, ids), grouped(x, w, ids)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        if not err < 1e-2:
            failed.append(f"{name}: kernel vs grouped path, max error {err:.2e} of the largest output")
        alone = device(x[:1], w[:1], ids[:1])
        if not torch.equal(alone[0], got[0]):
            failed.append(f"{name}: token 0 alone differs from token 0 in a batch of {x.shape[0]}")
        if not cpu:
            bx, bw, bids = (t.clone() for t in routing(8, 2))
            graph = torch.cuda.CUDAGraph()
            device(bx, bw, bids)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                out = device(bx, bw, bids)
            for seed in (3, 4):
                nx, nw, nids = routing(8, seed)
                bx.copy_(nx), bw.copy_(nw), bids.copy_(nids)
                graph.replay()
                if not torch.equal(out, device(nx, nw, nids)):
                    failed.append(f"{name}: a graph replay with new routing differs from the eager call")

        print(f"\n{name}: hidden {H}, {E} experts of {I}, top-{k}; kernel vs grouped max error {err:.1e}")
        print(f"{'tokens':>6} {'experts':>7} | {'device us':>9} {'GB/s':>7} | {'grouped us':>10} {'x':>6} | "
              f"{'static us':>9} {'x':>6}")
        for T in tokens:
            x, w, ids = routing(T, 10 + T)
            picked_ids = torch.unique(ids).tolist()
            picked = len(picked_ids)
            nbytes = sum(nb[e] for e in picked_ids)
            td, md = timed(lambda: device(x, w, ids))
            tg, mg = timed(lambda: grouped(x, w, ids), capture=False)
            ts, ms = timed(lambda: static(x, w, ids))
            print(f"{T:>6} {picked:>7} | {td * 1e6:>8.1f}{md:1} {nbytes / td / 1e9:>7.1f} | {tg * 1e6:>9.1f}{mg:1} "
                  f"{tg / td:>5.2f}x | {ts * 1e6:>8.1f}{ms:1} {ts / td:>5.2f}x")
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed))
        sys.exit(1)
    print("\nall checks passed")


class _Lin:
    """What expert_tables asks of an expert linear: its kernel for a dtype."""

    def __init__(self, kernel):
        self._kernel = kernel

    def kernel(self, dtype):
        return self._kernel


if __name__ == "__main__":
    main()
