"""EXL2 / GPTQ linears on the CPU: the C++ GEMV over the weights repacked as GGUF blocks
(exllamav2/ops/cpu/quant_repack.py, gemv_linear.SegmentedGemvKernel) against torch's int4 kernel (Int4Kernel, bf16
only) and the `torch` backend (F.linear on the dequantised matrix, kept), on SmolLM2-135M's linear shapes.

One thread (torch.set_num_threads(1)), CPU time of this thread (time.thread_time: other jobs on a shared machine
cost wall time, not this), min over interleaved repetitions of `--calls` calls each.

    python bench/bench_cpu_quant_gemv.py                 # per-linear table
    python bench/bench_cpu_quant_gemv.py --e2e           # and a converted EXL2 model's decode, before/after
Columns: gemv / int4 / torch in µs a call, `x best` = the fastest other path's time / gemv's (> 1: gemv faster);
'q4_1' times the 4-bit weights packed as Q4_1 (m = -8 d) instead of Q4_0, the layout choice quant_repack.py made.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels
from exllamav2.ops.cpu import linear as cpu_linear
from exllamav2.ops.cpu.gemv_linear import SegmentedGemvKernel
from exllamav2.ops.cpu.quant_repack import BlockSegment, exl2_blocks, pack_segments
from exllamav2.quant import exl2_pack, gptq_quantize, make_quant_weight
from exllamav2.quant.gguf_blocks import decode_blocks

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]   # (in, out): q/o, k/v, gate/up, down


def exl2_weight(n_in: int, out: int, widths: list[tuple[int, float]], seed: int):
    """Random EXL2 codes, g32, widths (bits, share of rows) in descending order, a random act-order permutation."""
    g = torch.Generator().manual_seed(seed)
    groups, left = [], n_in
    for i, (b, share) in enumerate(widths):
        rows = left if i == len(widths) - 1 else int(n_in * share) // 32 * 32
        groups += [(b, 32)] * (rows // 32)
        left -= rows
    codes = torch.cat([torch.randint(0, 1 << b, (r, out), generator=g) for b, r in groups])
    t = exl2_pack(codes, groups, torch.randint(0, 16, (len(groups), out), generator=g),
                  (torch.rand(len(groups), generator=g) * 0.02 + 0.005).half(), torch.randperm(n_in, generator=g))
    return make_quant_weight("exl2", t, n_in, out, torch.bfloat16, "cpu", fast_path=False)


def gptq_weight(n_in: int, out: int, seed: int):
    """GPTQ 4-bit g128 act-order (asymmetric, as AutoGPTQ's default), quantised with a random Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n_in, n_in, generator=g) * torch.linspace(0.1, 3, n_in)
    t = gptq_quantize(torch.randn(out, n_in, generator=g) * 0.02, group_size=128, act_order=True, sym=False,
                      hessian=x.T @ x)
    return make_quant_weight("gptq", t, n_in, out, torch.bfloat16, "cpu", fast_path=False)


def as_q4_1(q):
    """The weight's Q4_0 segments re-encoded as Q4_1 (m = -8 d), for the layout comparison."""
    segs = []
    for s in exl2_blocks(q):
        if s.ggml_type == "Q4_0":
            n, k = s.raw.shape[0], s.gather.shape[0]
            b = decode_blocks("Q4_0", s.raw, (n, k))
            nb = k // 32
            d = b.scale.half().numpy()
            digits = b.digits.numpy().astype(np.uint8).reshape(n, nb, 32)
            raw = np.concatenate([d.view(np.uint8).reshape(n, nb, 2), (-8 * d).view(np.uint8).reshape(n, nb, 2),
                                  digits[..., :16] | (digits[..., 16:] << 4)], axis=2).reshape(n, nb * 20)
            s = BlockSegment("Q4_1", raw, s.gather, s.pad)
        segs.append(s)
    return SegmentedGemvKernel(pack_segments(segs, q.out_features, q.in_features), q.bias, torch.bfloat16, q)


def bench(fns: dict, calls: int, reps: int) -> dict:
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():   # interleaved: a busy moment on the machine hits every path alike
            t0 = time.thread_time()
            for _ in range(calls):
                f()
            best[k] = min(best[k], (time.thread_time() - t0) / calls * 1e6)
    return best


def linear_table(args) -> None:
    weights = []
    for i, (n_in, out) in enumerate(SHAPES):
        weights.append(("exl2 4.0 g32", n_in, out, exl2_weight(n_in, out, [(4, 1.0)], i)))
        weights.append(("exl2 8/6 g32", n_in, out, exl2_weight(n_in, out, [(8, 0.25), (6, 0.75)], 10 + i)))
        weights.append(("gptq 4b g128 ao", n_in, out, gptq_weight(n_in, out, 20 + i)))
    print(f"{'weight':16} {'in x out':>10} {'rows':>4} {'dtype':>5} {'gemv':>8} {'q4_1':>8} {'int4':>8} {'torch':>8} "
          f"{'x best':>7}  segments")
    for name, n_in, out, q in weights:
        for dtype in (DTYPES[d] for d in args.dtypes):
            gemv = ops.prepare_linear(None, None, q, "cpu", dtype)
            assert isinstance(gemv, SegmentedGemvKernel), type(gemv)
            with ops.use_backend("torch"):
                ref = ops.prepare_linear(None, None, q, "cpu", dtype)
            for rows in args.rows:
                x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows)).to(dtype)
                fns = {"gemv": lambda: gemv(x), "torch": lambda: ref(x)}
                if dtype == torch.bfloat16:
                    packed = q.packed_matrix()
                    if packed is not None:
                        int4 = cpu_linear.Int4Kernel(packed, q.bias)
                        fns["int4"] = lambda: int4(x)
                    if name == "exl2 4.0 g32":
                        q41 = as_q4_1(q)
                        fns["q4_1"] = lambda: q41(x)
                t = bench(fns, args.calls, args.reps)
                others = min(v for k, v in t.items() if k not in ("gemv", "q4_1"))
                cell = lambda k: f"{t[k]:8.1f}" if k in t else f"{'-':>8}"
                print(f"{name:16} {f'{n_in}x{out}':>10} {rows:>4} {DTYPE_NAMES[dtype]:>5} {cell('gemv')} "
                      f"{cell('q4_1')} {cell('int4')} {cell('torch')} {others / t['gemv']:7.2f}  "
                      f"{'+'.join(gemv.packed.kinds)}", flush=True)
            q.release_dense()


def e2e(args) -> None:
    """A random SmolLM2-shaped Llama (4 layers) converted to EXL2 at 4.0 bpw, decoding one token a step through
    model.forward on the cpu backend: the C++ GEMV (after) against the previous path (int4 kernel for bf16, the
    torch backend for fp32), and the torch backend."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from exllamav2.conversion import ConvertSettings, convert_exl2
    from parity import make_tiny, save_hf_model
    from test_convert_common import make_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        make_tiny_llama(src, layers=args.layers)   # the tokenizer; the model replaced by a SmolLM2-shaped one
        cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, bos_token_id=0, eos_token_id=1)
        save_hf_model(make_tiny(LlamaForCausalLM, cfg, init_scale=0.05), src)
        t0 = time.monotonic()
        s = ConvertSettings(str(src), str(Path(tmp) / "exl2"), bits=4.0, head_bits=6, rows=4, length=64,
                            sensitivity=False)
        convert_exl2(s, progress=False)
        print(f"\nconverted in {time.monotonic() - t0:.0f} s")
        for dtype in (torch.bfloat16, torch.float32):
            config = ExLlamaV2Config(s.out_dir)
            config.dtype = dtype
            model = ExLlamaV2(config)
            model.load()
            ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))

            def decode():
                cache = ExLlamaV2Cache(model, max_seq_len=args.tokens + 16)
                model.forward(ids, cache, last_id_only=True)
                tok = ids[:, -1:]
                t0 = time.thread_time()
                for _ in range(args.tokens):
                    tok = model.forward(tok, cache)[:, -1:].argmax(-1)
                return args.tokens / (time.thread_time() - t0)

            results = {}
            for _ in range(args.reps):
                for label, backend, gemv_dtypes in (("after (gemv)", None, cpu_linear.QUANT_GEMV_DTYPES),
                                                    ("before", None, ()), ("torch backend", "torch", ())):
                    saved = cpu_linear.QUANT_GEMV_DTYPES
                    cpu_linear.QUANT_GEMV_DTYPES = gemv_dtypes
                    try:
                        with ops.use_backend(backend):   # bumps the dispatch generation: kernels re-prepared
                            with torch.inference_mode():
                                tps = decode()
                    finally:
                        cpu_linear.QUANT_GEMV_DTYPES = saved
                    results[label] = max(results.get(label, 0.0), tps)
            line = ", ".join(f"{k} {v:.1f}" for k, v in results.items())
            print(f"e2e {args.layers}-layer SmolLM2-shaped EXL2 4.0 bpw, {str(dtype)[6:]}: tokens/s (CPU time) {line}; "
                  f"after/before {results['after (gemv)'] / results['before']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e2e", action="store_true", help="also a converted model's decode tokens/s")
    ap.add_argument("--e2e-only", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not kernels.ready():
        raise SystemExit("the CPU kernels are not available here: nothing to compare")
    print(f"ISA {kernels.isa()}, torch {torch.__version__}, 1 thread, CPU time")
    if not args.e2e_only:
        linear_table(args)
    if args.e2e or args.e2e_only:
        e2e(args)


if __name__ == "__main__":
    main()
