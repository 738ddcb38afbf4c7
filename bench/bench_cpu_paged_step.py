"""Per-token main-thread CPU time of the dynamic generator's decode step on the CPU (issues #16/#19): the compiled
paged step (runtime/paged_decode.py, `compile_decode(paged=True)`), the eager packed step (the same generator with
the paged step switched off), and the seed loop `model.forward(token, cache)` through the same runner's compiled
contiguous-cache step, on one model.

    python bench/bench_cpu_paged_step.py [--model PATH.gguf] [--tokens 100] [--threads 1] [--repeats 3]

time.thread_time() per token: the CPU time of the calling thread only, which a busy shared machine disturbs far
less than wall time (with --threads 1 all the work runs on that thread). Each row: the median over the tokens of
the best of --repeats runs (min over runs of the per-run median), and that run's mean. The first run of each
configuration compiles (about a minute per graph; inductor then caches it on disk) and is not timed. The printed
token ids check that the three loops decode the same greedy tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

DEFAULT_MODEL = os.path.expanduser("~/.cache/exllamav2/bench/SmolLM2-135M-Instruct.Q4_1-Q4_0.gguf")


def dynamic_tokens(gen, ids: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """A greedy job of n tokens; (token ids, CPU seconds of the main thread per streamed token after the first)."""
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob
    gen.reset_page_table()
    job = ExLlamaV2DynamicJob(ids, n, gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[])
    gen.enqueue(job)
    tokens, times, last = [], [], None
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["stage"] != "streaming":
                continue
            k = r["token_ids"].shape[-1]
            if k:
                now = time.thread_time()
                if last is not None:
                    times.append((now - last) / k)
                last = now
                tokens.extend(r["token_ids"].view(-1).tolist())
    return tokens, times


def seed_tokens(model, cache, ids: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """The seed's loop: prefill, then model.forward(token, cache) per token, greedy."""
    cache.current_seq_len = 0
    with torch.inference_mode():
        logits = model.forward(ids[:, :-1], cache, preprocess_only=True) if ids.shape[1] > 1 else None
        tok = ids[:, -1:]
        tokens, times = [], []
        for _ in range(n):
            t0 = time.thread_time()
            logits = model.forward(tok, cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.thread_time() - t0)
            tokens.append(int(tok))
    return tokens, times[1:]


class StepTimer:
    """Main-thread CPU time inside the runner's compiled steps (`runner.trusted.call`, runtime/guards.py), to tell the
    step from the generator's own work around it."""

    def __init__(self, runner):
        self.times: list[float] = []
        self.inner = runner.trusted.call
        runner.trusted.call = self

    def __call__(self, *args):
        t0 = time.thread_time()
        try:
            return self.inner(*args)
        finally:
            self.times.append(time.thread_time() - t0)

    def run(self, fn, *args):
        """fn(*args) -> (tokens, times); returns (tokens, times, step times)."""
        self.times = []
        tokens, times = fn(*args)
        return tokens, times, self.times[1:]


def best(runs) -> tuple[float, float, float | None, list[int]]:
    """(median ms, mean ms, median ms in the compiled step or None, tokens) of the run with the lowest median."""
    tokens, times, steps = min(runs, key=lambda r: statistics.median(r[1]))
    return (statistics.median(times) * 1e3, statistics.mean(times) * 1e3,
            statistics.median(steps) * 1e3 if steps else None, tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=512)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
    cfg = ExLlamaV2Config(args.model)
    cfg.max_seq_len = args.max_seq_len
    model = ExLlamaV2(cfg)
    model.load(progress=False)
    tokenizer = ExLlamaV2Tokenizer(cfg)
    ids = tokenizer.encode("The history of the printing press begins")
    runner = model.compile_decode(max_seq_len=args.max_seq_len, progress=False, paged=True)
    cache = ExLlamaV2Cache(model, max_seq_len=args.max_seq_len)
    gen = ExLlamaV2DynamicGenerator(model, cache, tokenizer, page_size=args.page_size)
    rows = {}
    timer = StepTimer(runner)
    runs = [timer.run(dynamic_tokens, gen, ids, args.tokens) for _ in range(args.repeats + 1)][1:]
    assert runner.paged is not None and runner.paged.failed is None, "the compiled paged step did not run"
    rows["dynamic, compiled paged step"] = best(runs)
    paged, runner.paged = runner.paged, None  # the same generator, its decode steps through the eager packed forward
    rows["dynamic, eager packed step"] = best([timer.run(dynamic_tokens, gen, ids, args.tokens)
                                               for _ in range(args.repeats)])
    runner.paged = paged
    seed_cache = ExLlamaV2Cache(model, max_seq_len=args.max_seq_len)
    runs = [timer.run(seed_tokens, model, seed_cache, ids, args.tokens) for _ in range(args.repeats + 1)][1:]
    rows["seed loop, compiled step"] = best(runs)
    print(f"# {os.path.basename(args.model)}, {args.threads} thread(s), {args.tokens} tokens, page size "
          f"{args.page_size}: main-thread CPU ms per token, best of {args.repeats} runs")
    print("| loop | median ms | mean ms | tok/s (median) | in the compiled step, median ms |")
    print("|---|---|---|---|---|")
    for name, (med, mean, step, _) in rows.items():
        print(f"| {name} | {med:.2f} | {mean:.2f} | {1e3 / med:.0f} | {'-' if step is None else f'{step:.2f}'} |")
    toks = {name: r[3] for name, r in rows.items()}
    first = next(iter(toks.values()))
    for name, t in toks.items():
        same = next((i for i, (a, b) in enumerate(zip(t, first)) if a != b), min(len(t), len(first)))
        print(f"{name}: the first {same} of {len(t)} greedy tokens as the compiled paged step's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
