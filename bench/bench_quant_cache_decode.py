"""Seed-API decode over quantized KV caches (cache_q.py) on the CPU, eager against the decode runner
(model.compile_decode(): a quantized cache runs the compiled paged step that reads the codes inside attention,
runtime/decode.py), beside the plain cache, in one process:

    python bench/bench_quant_cache_decode.py [-m MODEL] [--context 1024] [--tokens 32] [--caches fp16,Q4,Q8]

For each cache: a `--context`-token prompt, then `--tokens` greedy decode steps through model.forward; prints
ms per decode step (median over the steps) eager and compiled, and the compiled speed-up. `--no-compile` times the
eager steps only (the test suite's smoke run).
"""

from __future__ import annotations

import argparse
import statistics
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    raise SystemExit(main())
