"""Quantized linears on a GPU (#17): Llama-3-8B's matrix shapes in EXL2 2.5 / 4.0 / 6.0 bpw, GPTQ 4-bit g128,
GGUF Q4_K and dense fp16, through the `triton` backend's kernels (exllamav2/ops/triton/linear.py).

    python bench/gpu/bench_linears.py                      # a GPU; a few minutes on an H200; writes $OUT (or --out)
    python bench/gpu/bench_linears.py --cpu --out DIR      # Triton's interpreter on tiny shapes (the test suite's run)

Nothing is downloaded. Weights are random codes in each format's real layout, built on the device (any bits are
valid codes; group tables, scale maxima and permutations are built consistently), and read back through the
project's own readers (read_exl2, read_gptq, GgufWeight). Then, per format and shape:
1. checks: the kernel's dequantised matrix against the reference dequantiser (bit for bit for EXL2 / GPTQ), its
   products against F.linear on that matrix (fp16 and bf16, both paths), and batch invariance;
2. timings at M in {1, 4, 16, 64, 512} rows, of both paths (fused few-row matmul, dequantise-then-matmul), each a
   CUDA-graph replay over enough copies of the weight to exceed the L2 cache; GB/s of resident weight bytes, the
   share of the GPU's bandwidth, and the speed-up over dense fp16 F.linear at the same shape and M;
3. resident bytes per format (one decoder layer: q, k, v, o, gate, up, down) against the file's bytes.
Writes bench_linears.json and bench_linears.md (the table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from exllamav2 import ops  # noqa: E402
from exllamav2.quant import make_quant_weight  # noqa: E402

# (out, in) of Llama-3-8B's decoder matrices, and how many of each one layer holds
SHAPES_8B = {"q_proj/o_proj": ((4096, 4096), 2), "k_proj/v_proj": ((1024, 4096), 2),
             "gate_proj/up_proj": ((14336, 4096), 2), "down_proj": ((4096, 14336), 1)}
SHAPES_CPU = {"tiny": ((128, 256), 7)}
ROWS_GPU = (1, 4, 16, 64, 512)
ROWS_CPU = (1, 40)
# EXL2 width mixes (share of rows per width, widths descending) in groups of 32 rows: 4 bits of q_scale per group
# and column add 0.125 bpw
EXL2_MIXES = {2.5: [(3, 0.4), (2, 0.6)], 4.0: [(5, 0.1), (4, 0.7), (3, 0.2)], 6.0: [(8, 0.1), (6, 0.7), (5, 0.2)]}
FORMATS = ("fp16", "exl2_2.5", "exl2_4.0", "exl2_6.0", "gptq_4bit_g128", "gguf_Q4_K")
# more GGUF types of llama.cpp's mixes, on request (--formats): the default run's length stays as it was
EXTRA_FORMATS = ("gguf_Q6_K", "gguf_Q5_0", "gguf_Q3_K", "gguf_IQ4_XS")
# Peak memory bandwidth (GB/s) by device name, from the vendors' data sheets; a measured copy is reported beside it
PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "RTX 4090": 1008, "RTX 3090": 936, "A10G": 600}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- weights

def _rand_words(shape, device, gen) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device, generator=gen)


def exl2_tensors(out: int, n_in: int, bpw: float, device, gen) -> dict[str, torch.Tensor]:
    """On-disk EXL2 tensors: random q_weight words for the width mix, random scale codes, a random permutation."""
    group = 32
    mix = EXL2_MIXES[bpw]
    groups, left = [], n_in // group
    for i, (bits, share) in enumerate(mix):
        n = left if i == len(mix) - 1 else min(left, round(n_in * share / group))
        groups += [bits] * n
        left -= n
    out_pad = -(-out // 32) * 32
    qrows = [group * b // 32 for b in groups]
    starts = np.cumsum([0] + qrows[:-1])
    return {
        "q_weight": _rand_words((sum(qrows), out_pad), device, gen),
        "q_scale": _rand_words((len(groups), out_pad // 8), device, gen),
        "q_scale_max": (torch.rand(len(groups), device=device, generator=gen) * 0.01 + 0.005).half(),
        "q_groups": torch.tensor([v for b, s in zip(groups, starts) for v in (b, int(s))], dtype=torch.int16,
                                 device=device),
        "q_invperm": torch.randperm(n_in, device=device, generator=gen).to(torch.int32),
    }


def gptq_tensors(out: int, n_in: int, device, gen, group: int = 128) -> dict[str, torch.Tensor]:
    groups = n_in // group
    return {
        "qweight": _rand_words((n_in // 8, out), device, gen),
        "qzeros": _rand_words((groups, out // 8), device, gen),
        "scales": (torch.rand(groups, out, device=device, generator=gen) * 0.002 + 0.001).half(),
        "g_idx": (torch.arange(n_in, device=device) // group).to(torch.int32),
    }


class BlockSource:
    """One GGUF tensor held in memory, read through the interface GgufWeight uses (exllamav2/gguf/reader.py)."""

    def __init__(self, qtype: str, shape: tuple[int, int], rng: np.random.Generator):
        from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY, F16_FIELDS
        block, block_bytes = BLOCK_GEOMETRY[qtype]
        rows, cols = shape
        blocks = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
        # the fp16 d (and m / dmin) fields small and finite; any other bytes are valid
        d_at, m_at = F16_FIELDS[qtype]
        d = (0.002 * (0.5 + rng.random(blocks.shape[:2]))).astype(np.float16)
        blocks[..., d_at:d_at + 2] = d.view(np.uint8).reshape(*d.shape, 2)
        if m_at is not None:
            m = (d.astype(np.float32) * 7.5).astype(np.float16)
            blocks[..., m_at:m_at + 2] = m.view(np.uint8).reshape(*d.shape, 2)
        self.qtype, self.shape_, self.data = qtype, shape, blocks.reshape(rows, -1)

    def ggml_type(self, name):
        return self.qtype

    def shape(self, name):
        return self.shape_

    def nbytes(self, name):
        return self.data.nbytes

    def raw(self, name):
        return self.qtype, self.data, self.shape_

    def get_tensor(self, name, device="cpu", dtype=None):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        values = dequantize(self.data, GGMLQuantizationType[self.qtype]).reshape(self.shape_)
        return torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=dtype or torch.float32)


def make_weight(fmt: str, out: int, n_in: int, device, seed: int):
    """(weight, file bytes): a QuantWeight, or the dense fp16 (out, in) matrix."""
    gen = torch.Generator(device=device).manual_seed(seed)
    key = f"{fmt}.{out}x{n_in}"
    if fmt == "fp16":
        w = torch.randn(out, n_in, device=device, generator=gen, dtype=torch.float16) * 0.02
        return w, w.numel() * 2
    if fmt.startswith("exl2_"):
        t = exl2_tensors(out, n_in, float(fmt.split("_")[1]), device, gen)
    elif fmt.startswith("gptq_"):
        t = gptq_tensors(out, n_in, device, gen)
    else:
        from exllamav2.quant.gguf import GgufWeight
        src = BlockSource(fmt.split("_", 1)[1], (out, n_in), np.random.default_rng(seed))
        return GgufWeight(key, [(src, key, out)], n_in, out, torch.float16, device, fast_path=False), src.data.nbytes
    file_bytes = sum(v.numel() * v.element_size() for v in t.values())
    return make_quant_weight(key, t, n_in, out, torch.float16, device, fast_path=False), file_bytes


def resident_bytes(kernel) -> int:
    seen, total = set(), 0
    for t in kernel.resident_tensors():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns, device, reps: int) -> tuple[float, bool]:
    """Seconds per call of fns (callables over distinct weight copies, run in turn), and whether it was graphed."""
    if device.type != "cuda":  # the interpreter: one call (nothing to warm up), a check that it runs
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) / len(fns), False
    for f in fns:
        f()
    sync(device)
    graphed = True
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        run = g.replay
    except Exception:  # a call that cannot be captured is timed eagerly
        graphed = False

        def run():
            for f in fns:
                f()
    run()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(fns)))
    return sorted(times)[1], graphed


def measured_copy_gbs(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.empty(2**28, dtype=torch.float32, device=device)   # 1 GiB
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3) / 1e9


def peak_gbs(name: str) -> float | None:
    for k in sorted(PEAK_GBS, key=len, reverse=True):
        if k.lower() in name.lower():
            return float(PEAK_GBS[k])
    return None


# ---------------------------------------------------------------------------------------------- checks

def close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> tuple[bool, float]:
    span = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs().max().item()
    return bool(err <= rel * span + 1e-3), err / max(span, 1e-12)


def check_format(fmt, q, kernels, device, rows_dense: int, quick: bool) -> list[dict]:
    """Kernel vs reference for one weight: dequantised tiles, products (both paths, fp16 and bf16), invariance.
    quick (the interpreter): fewer calls."""
    results = []
    k16 = kernels[torch.float16]
    exact = not fmt.startswith("gguf")
    ref_w = q.dense(torch.float16)
    got_w = k16.dequantize()
    if exact:
        results.append({"check": "dequantise == reference", "ok": bool(torch.equal(got_w, ref_w))})
    else:
        ok, rel = close(got_w, ref_w, 1e-3)
        results.append({"check": "dequantise ~ reference", "ok": ok, "rel_err": rel})
    q.release_dense()
    gen = torch.Generator(device=device).manual_seed(1)
    for dtype, k in kernels.items():
        w = q.dense(dtype)
        for m in ((1, rows_dense) if dtype == torch.float16 else (1,)) if quick else (1, 16, rows_dense):
            x = torch.randn(m, q.in_features, device=device, generator=gen).to(dtype)
            ref = F.linear(x, w, None if q.bias is None else q.bias.to(dtype))
            # the interpreter's bf16 casts truncate: looser there
            rel = 2e-3 if dtype == torch.float16 else (2e-2 if k.interpret else 8e-3)
            ok, err = close(k(x), ref, rel)
            results.append({"check": f"{str(dtype)[6:]} M={m} ({'dense' if m > k.dense_rows else 'fused'})",
                            "ok": ok, "rel_err": err})
        q.release_dense()
    m = 4 if quick else 16
    x = torch.randn(m, q.in_features, device=device, generator=gen).half()
    y = k16(x)
    results.append({"check": f"batch invariance (M={m} vs rows alone)",
                    "ok": all(torch.equal(k16(x[i:i + 1]), y[i:i + 1]) for i in ((0, m - 1) if quick else (0, 7, 15)))})
    return results


# ---------------------------------------------------------------------------------------------- main

def run(args) -> dict:
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_linears: no CUDA device; run with --cpu for the interpreter check")
    shapes = SHAPES_CPU if args.cpu else SHAPES_8B
    rows_list = ROWS_CPU if args.cpu else tuple(args.rows)
    formats = args.formats
    from exllamav2.ops.triton import linear as triton_linear
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'interpreter'})"
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    report = {"device": name, "interpreter": args.cpu, "peak_gbs": peak_gbs(name),
              "measured_copy_gbs": measured_copy_gbs(device), "dense_rows": triton_linear.DENSE_ROWS,
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "checks": {}, "timings": [], "resident": {}}
    log(f"bench_linears: {name}; formats {', '.join(formats)}; M {list(rows_list)}")
    fp16_times: dict = {}
    t_start = time.time()
    failed_formats = set()
    for fmt in formats:
        per_layer_res = per_layer_file = 0
        for shape_name, ((out, n_in), count) in shapes.items():
            try:
                t0 = time.time()
                q, file_bytes = make_weight(fmt, out, n_in, device, seed=out + n_in)
                if fmt == "fp16":
                    res = file_bytes
                    weights = [q] + [q.clone() for _ in range(max(0, _copies(res, l2) - 1))]
                    fns_for = {m: [(lambda w=w, x=x: F.linear(x, w)) for w in weights]
                               for m, x in ((m, torch.randn(m, n_in, device=device).half()) for m in rows_list)}
                    paths = {"dense": fns_for}
                else:
                    with ops.use_backend("triton"):
                        kernels = {dt: ops.prepare_linear(None, None, q, device, dt, name=q.key)
                                   for dt in (torch.float16, torch.bfloat16)}
                    k = kernels[torch.float16]
                    res = resident_bytes(k)
                    report["checks"][f"{fmt} {shape_name}"] = check_format(fmt, q, kernels, device, max(rows_list), args.cpu)
                    copies = [k] + [_copy_kernel(fmt, out, n_in, device, i) for i in range(1, _copies(res, l2))]
                    paths = {}
                    for path in ("fused", "dense"):
                        paths[path] = {m: [(lambda kk=kk, x=x, p=path: getattr(kk, f"{p}_matmul")(x)) for kk in copies]
                                       for m, x in ((m, torch.randn(m, n_in, device=device).half()) for m in rows_list)}
                per_layer_res += res * count
                per_layer_file += file_bytes * count
                for path, by_m in paths.items():
                    for m, fns in by_m.items():
                        if args.cpu and path != "dense" and fmt != "fp16" and m > triton_linear.DENSE_ROWS:
                            continue   # the interpreter is slow: time the path each M takes
                        if args.cpu and path == "dense" and fmt != "fp16" and m <= triton_linear.DENSE_ROWS:
                            continue
                        sec, graphed = time_calls(fns, device, args.reps)
                        row = {"format": fmt, "shape": shape_name, "out": out, "in": n_in, "M": m, "path": path,
                               "us": sec * 1e6, "weight_gbs": res / sec / 1e9, "graphed": graphed,
                               "auto": fmt == "fp16" or (path == "dense") == (m > triton_linear.DENSE_ROWS)}
                        if report["peak_gbs"]:
                            row["share_of_peak"] = row["weight_gbs"] / report["peak_gbs"]
                        if fmt == "fp16":
                            fp16_times[(shape_name, m)] = sec
                        elif (shape_name, m) in fp16_times:
                            row["speedup_vs_fp16"] = fp16_times[(shape_name, m)] / sec
                        report["timings"].append(row)
                del q, paths
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log(f"  {fmt:15s} {shape_name:18s} {time.time() - t0:6.1f} s")
            except Exception as e:  # one format failing on a GPU must not cost the others' figures
                import traceback
                traceback.print_exc()
                report["checks"][f"{fmt} {shape_name}"] = [{"check": "ran", "ok": False, "error": repr(e)}]
                failed_formats.add(fmt)
        if fmt in failed_formats:
            continue
        report["resident"][fmt] = {"layer_resident_bytes": per_layer_res, "layer_file_bytes": per_layer_file,
                                   "ratio": per_layer_res / per_layer_file,
                                   "bits_per_weight": 8 * per_layer_file / sum(o * i * c for (o, i), c in shapes.values())}
    report["scratch_bytes"] = triton_linear.scratch_bytes()
    report["seconds"] = time.time() - t_start
    report["all_checks_pass"] = all(c["ok"] for cs in report["checks"].values() for c in cs)
    return report


def _copies(nbytes: int, l2: int) -> int:
    """Weight copies a timing cycles through so that their bytes exceed twice the L2 cache."""
    return 1 if l2 == 0 else max(1, min(64, math.ceil(2 * l2 / max(nbytes, 1))))


def _copy_kernel(fmt, out, n_in, device, i):
    q, _ = make_weight(fmt, out, n_in, device, seed=out + n_in + 1000 * i)
    with ops.use_backend("triton"):
        return ops.prepare_linear(None, None, q, device, torch.float16, name=q.key)


def table(report: dict) -> str:
    lines = [f"# Quantized linears on {report['device']}",
             "",
             f"torch {report['torch']}, triton {report['triton']}; peak bandwidth "
             f"{report['peak_gbs'] or '?'} GB/s (data sheet), measured copy "
             f"{report['measured_copy_gbs'] and round(report['measured_copy_gbs'])} GB/s; the kernels switch to "
             f"dequantise-then-matmul above {report['dense_rows']} rows ('*' marks the path a call takes)."
             + (" Interpreter run: times are not speeds." if report["interpreter"] else ""),
             "",
             "| format | shape (out x in) | M | path | µs | weight GB/s | % of peak | x fp16 F.linear |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        peak = f"{100 * r['share_of_peak']:.0f}%" if "share_of_peak" in r else "-"
        sp = f"{r['speedup_vs_fp16']:.2f}" if "speedup_vs_fp16" in r else "-"
        lines.append(f"| {r['format']} | {r['shape']} ({r['out']}x{r['in']}) | {r['M']} | {r['path']}"
                     f"{'*' if r['auto'] else ''}{'' if r['graphed'] or report['interpreter'] else ' (eager)'} | "
                     f"{r['us']:.1f} | {r['weight_gbs']:.0f} | {peak} | {sp} |")
    lines += ["", "| format | bpw | layer resident MB | layer file MB | resident / file |", "|---|---|---|---|---|"]
    for fmt, r in report["resident"].items():
        lines.append(f"| {fmt} | {r['bits_per_weight']:.2f} | {r['layer_resident_bytes'] / 2**20:.1f} | "
                     f"{r['layer_file_bytes'] / 2**20:.1f} | {r['ratio']:.3f} |")
    failed = [(k, c) for k, cs in report["checks"].items() for c in cs if not c["ok"]]
    lines += ["", f"Checks against the reference: {'all pass' if not failed else f'{len(failed)} FAILED'} "
                  f"({sum(len(cs) for cs in report['checks'].values())} checks)."]
    lines += [f"- FAILED {k}: {c}" for k, c in failed]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="Triton's interpreter on tiny shapes (no GPU needed)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                   help="folder for bench_linears.json and bench_linears.md (default: $OUT, else bench/gpu/results)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS + EXTRA_FORMATS)
    p.add_argument("--rows", nargs="+", type=int, default=list(ROWS_GPU), help="row counts M (GPU runs)")
    p.add_argument("--reps", type=int, default=20, help="graph replays per timing (GPU runs)")
    args = p.parse_args(argv)
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_linears.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = table(report)
    with open(os.path.join(args.out, "bench_linears.md"), "w") as f:
        f.write(text)
    print(text)
    log(f"bench_linears: {report['seconds']:.0f} s; wrote {args.out}/bench_linears.json and .md")
    return 0 if report["all_checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
