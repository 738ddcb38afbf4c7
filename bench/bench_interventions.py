"""Decode speed with no intervention, one steering vector on one layer, and one capture on one layer.

Configurations are interleaved within each repetition (the machine is shared, so only ratios within one run
mean anything); prints tok/s per configuration (median over repetitions) and ratios to "none".

    python bench/bench_interventions.py --tokens 32 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.interventions import AddVector, add_capture, add_edit, wrapped_slots


def decode_tps(model, cache, prompt, tokens: int) -> float:
    cache.current_seq_len = 0
    model.forward(prompt[:, :-1], cache, preprocess_only=True)
    tok = prompt[:, -1:]
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = model.forward(tok, cache)[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="e.g. float32 (default: the engine's default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = ExLlamaV2Config(args.model or smollm2_gguf_path())
    cfg.max_seq_len = 256
    cfg.max_batch_size = args.batch
    if args.dtype:
        cfg.dtype = args.dtype
    model = ExLlamaV2(cfg)
    model.load()
    cache = ExLlamaV2Cache(model, batch_size=args.batch, max_seq_len=cfg.max_seq_len)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, 16), generator=torch.Generator().manual_seed(0))
    layer = cfg.num_hidden_layers // 2
    vec = torch.randn(cfg.hidden_size) * 0.1

    def none():
        return decode_tps(model, cache, prompt, args.tokens)

    def steering():
        with add_edit(model, f"blocks.{layer}.resid_post", AddVector(vec, 4.0)):
            return decode_tps(model, cache, prompt, args.tokens)

    def capture():
        with add_capture(model, f"blocks.{layer}.resid_post", positions="generated"):
            return decode_tps(model, cache, prompt, args.tokens)

    configs = {"none": none, "steering": steering, "capture": capture}
    none()  # warm-up
    results: dict = {k: [] for k in configs}
    for _ in range(args.reps):
        for name, fn in configs.items():
            results[name].append(fn())
    assert not wrapped_slots(model)
    base = statistics.median(results["none"])
    print(f"decode, batch {args.batch}, {args.tokens} tokens x {args.reps} interleaved reps, layer {layer}, "
          f"threads {args.threads}, dtype {model.dtype}")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"  {name:9s} {med:8.1f} tok/s   ratio to none {med / base:.3f}   "
              f"(min {min(vals):.1f}, max {max(vals):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
