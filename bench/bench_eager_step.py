"""The eager decode step with the short path through the decoder blocks (exllamav2/eager_decode.py: one C++ op per
attention and MLP block where the linears allow) against the same tree with it switched off (the modules' general
forwards), alternating in one process: `model.forward` of one token after an 8-token prompt, and optionally the
dynamic generator (what `serve` runs) with J greedy jobs. Best of --reps rounds per side; 2 threads.

    python bench/bench_eager_step.py -m ~/.cache/exllamav2/bench/SmolLM2-135M-Instruct.Q4_1-Q4_0.gguf --dynamic 1,4

Default model: the shipped SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


@contextlib.contextmanager
def short_path(enabled: bool):
    from exllamav2 import eager_decode
    saved = eager_decode.attention, eager_decode.mlp
    if not enabled:
        eager_decode.attention = eager_decode.mlp = lambda *a: None
    try:
        yield
    finally:
        eager_decode.attention, eager_decode.mlp = saved


def step_ms(model, cache, steps: int) -> float:
    tok = torch.tensor([[500]])
    cache.current_seq_len = 8
    t = time.perf_counter()
    for _ in range(steps):
        model.forward(tok, cache, last_id_only=True)
    return (time.perf_counter() - t) / steps * 1e3


def dynamic_tok_s(gen, tok, jobs: int, tokens: int) -> float:
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    gen.enqueue([ExLlamaV2DynamicJob(tok.encode(f"Story number {i}: once upon a time"), tokens, stop_conditions=[],
                                     gen_settings=ExLlamaV2Sampler.Settings.greedy()) for i in range(jobs)])
    n, t0 = 0, None
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming":
                t0 = t0 or time.perf_counter()
                n += r["token_ids"].shape[-1]
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--steps", type=int, default=100, help="decode steps per round")
    p.add_argument("--reps", type=int, default=3, help="rounds per side, alternating")
    p.add_argument("--dynamic", default="", help="comma-separated job counts for the dynamic generator rows")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per dynamic-generator job")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.default_models import smollm2_gguf_path
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator

    cfg = ExLlamaV2Config(args.model or smollm2_gguf_path())
    cfg.max_seq_len = 2048
    model = ExLlamaV2(cfg)
    model.load()
    cache = ExLlamaV2Cache(model, max_seq_len=512)
    with torch.inference_mode():
        model.forward(torch.randint(100, 20000, (1, 8), generator=torch.Generator().manual_seed(0)), cache)
    rows = {"eager step, ms": ("min", lambda: step_ms(model, cache, args.steps))}
    if args.dynamic:
        tok = ExLlamaV2Tokenizer(cfg)
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 4096), tok)
        for j in (int(v) for v in args.dynamic.split(",")):
            rows[f"dynamic generator, {j} job(s), tok/s"] = ("max", lambda j=j: dynamic_tok_s(gen, tok, j, args.tokens))
    best: dict = {}
    for rnd in range(args.reps + 1):  # round 0 warms both sides up and is not counted
        for side in (False, True):
            with short_path(side), torch.inference_mode():
                for name, (agg, fn) in rows.items():
                    v = fn()
                    if rnd > 0:
                        old = best.get((name, side))
                        best[(name, side)] = v if old is None else (min if agg == "min" else max)(old, v)
    print(f"{cfg.gguf_path or cfg.model_dir}: best of {args.reps} alternating rounds, {args.threads} threads")
    print("| | general forward | short path | speed-up |\n|---|---|---|---|")
    for name, (agg, _fn) in rows.items():
        off, on = best[(name, False)], best[(name, True)]
        print(f"| {name} | {off:.2f} | {on:.2f} | {(off / on if agg == 'min' else on / off):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
