"""Seed-API decode over quantized KV caches (cache_q.py) on the CPU, eager against the decode runner
(model.compile_decode(): a quantized cache runs the compiled paged step that reads the codes inside attention,
runtime/decode.py), beside the plain cache, in one process:

    python bench/bench_quant_cache_decode.py [-m MODEL] [--context 1024] [--tokens 32] [--caches fp16,Q4,Q8]

For each cache: a `--context`-token prompt, then `--tokens` greedy decode steps through model.forward; prints
ms per decode step (median over the steps) eager and compiled, and the compiled speed-up. `--no-compile` times the
eager steps only (the test suite's smoke run). Two more measures, instead of the table:

    --prefill   ms to read the `--context`-token prompt into each cache (model.forward, preprocess_only; best of 3)
    --op        us per call of the CPU decode attention over quantized pages alone (csrc/attention_quant.cpp), one
                sequence of `--context` keys with SmolLM2's heads (9 q / 3 kv, head_dim 64), per format (best of 200);
                with `--layers N` the calls go round N layers' pages after 64 MiB were written, as a model's do (the
                pages streamed from memory, not hot in L2): us per call over a round, best of 20 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

CACHES = {"fp16": "ExLlamaV2Cache", "Q4": "ExLlamaV2Cache_Q4", "Q6": "ExLlamaV2Cache_Q6",
          "Q8": "ExLlamaV2Cache_Q8", "FP8": "ExLlamaV2Cache_8bit"}


def decode_ms(model, cache_cls, ids: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    """Median ms per decode step after the prompt, and the greedy tokens (a cache of the model's max_seq_len, the
    length the compiled steps were made for)."""
    cache = cache_cls(model, 1, model.config.max_seq_len)
    with torch.inference_mode():
        logits = model.forward(ids, cache, last_id_only=True)
        out, times = [], []
        for _ in range(tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(tok))
            t0 = time.perf_counter()
            logits = model.forward(tok, cache)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] if len(times) > 1 else times) * 1000, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens before the decode steps")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--caches", default="fp16,Q4,Q8", help=f"comma-separated, of {', '.join(CACHES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="eager steps only")
    p.add_argument("--prefill", action="store_true", help="time the prompt into each cache instead")
    p.add_argument("--op", action="store_true", help="time the quantized-page attention op alone instead")
    p.add_argument("--layers", type=int, default=1, help="--op: go round this many layers' pages (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.op:
        return op_alone(args.context, max(1, args.layers))

    import exllamav2
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.default_models import smollm2_gguf_path

    names = [c.strip() for c in args.caches.split(",") if c.strip()]
    unknown = [c for c in names if c not in CACHES]
    if unknown:
        p.error(f"--caches: unknown {', '.join(unknown)}; expected some of {', '.join(CACHES)}")
    path = args.model or smollm2_gguf_path()
    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = -(-(args.context + args.tokens + 1) // 256) * 256
    model = ExLlamaV2(cfg)
    model.load(progress=False)
    ids = torch.randint(100, min(20000, cfg.vocab_size), (1, args.context), generator=torch.Generator().manual_seed(0))
    if args.prefill:
        return prefill_ms(model, ids, names, path, args.threads)
    eager = {c: decode_ms(model, getattr(exllamav2, CACHES[c]), ids, args.tokens) for c in names}
    compiled = {}
    if not args.no_compile:
        model.compile_decode(max_seq_len=cfg.max_seq_len)
        for c in names:
            cls = getattr(exllamav2, CACHES[c])
            decode_ms(model, cls, ids[:, :16], 2)  # compiles this cache's step (once)
            compiled[c] = decode_ms(model, cls, ids, args.tokens)
        model.decode_runner = None
    print(f"{path.split('/')[-1]}: {args.context}-token context, {args.tokens} decode steps, {args.threads} threads")
    print("| cache | eager ms/step | compiled ms/step | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    for c in names:
        e = eager[c]
        if c in compiled:
            k = compiled[c]
            print(f"| {c} | {e[0]:.2f} | {k[0]:.2f} | {e[0] / k[0]:.2f}x | {e[1] == k[1]} |")
        else:
            print(f"| {c} | {e[0]:.2f} | – | – | – |")
    return 0


def prefill_ms(model, ids: torch.Tensor, names: list, path: str, threads: int) -> int:
    import exllamav2
    print(f"{path.split('/')[-1]}: a {ids.shape[1]}-token prompt into each cache, {threads} threads (ms, best of 3)")
    for c in names:
        cache = getattr(exllamav2, CACHES[c])(model, 1, model.config.max_seq_len)
        best = float("inf")
        for _ in range(3):
            cache.current_seq_len = 0
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.forward(ids, cache, preprocess_only=True)
            best = min(best, time.perf_counter() - t0)
        print(f"| {c} | {best * 1000:.1f} |")
    return 0


def op_alone(keys: int, layers: int) -> int:
    from bench_cpu_rope import per_call_us
    from exllamav2.ops.cpu import attention, kernels
    from exllamav2.ops.torch_ref.kv_quant import QuantPages, format_named
    if not kernels.ready() or not kernels.loaded_with_avx512():
        print("error: the CPU kernels (AVX-512) are not available here", file=sys.stderr)
        return 2
    page, hk, d = 256, 3, 64
    pages_n = -(-keys // page)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, d, generator=g).bfloat16()
    table, lens = torch.arange(pages_n).view(1, -1), torch.tensor([keys])
    how = "best of 200" if layers == 1 else f"round {layers} layers' pages, best of 20 rounds"
    print(f"quantized-page decode attention alone: {keys} keys, 9/3 heads, head_dim 64, bf16 (us per call, {how})")
    for name in ("q4", "q8", "fp8"):
        f = format_named(name)
        stack = []
        for _ in range(layers):
            k, v = (torch.randn(pages_n * page, hk, d, generator=g).bfloat16() for _ in range(2))
            kc, ks = f.quantize(k, torch.bfloat16)
            vc, vs = f.quantize(v, torch.bfloat16)
            stack.append(QuantPages(kc, ks, vc, vs, f, f, torch.bfloat16))

        def call(pages):
            return attention.quant_paged_decode(q, pages, table, lens, page, 0, 0.125, 0.0)

        if layers == 1:
            us = per_call_us(lambda: call(stack[0]), 200)
        else:
            # between rounds 64 MiB are written (the weights a model streams between two layers' attention evict
            # the pages from the caches likewise), outside the timed calls
            junk, best = torch.zeros(64 << 20, dtype=torch.uint8), float("inf")
            for pages in stack:
                call(pages)
            for _ in range(20):
                junk.add_(1)
                t0 = time.perf_counter()
                for pages in stack:
                    call(pages)
                best = min(best, time.perf_counter() - t0)
            us = best / layers * 1e6
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
