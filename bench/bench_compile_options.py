"""Two compiled decode steps of one model in one process, timed alternately: the default inductor options
(exllamav2/runtime/compile.py: INDUCTOR_OPTIONS) against the same with --options changed, so the comparison does not
depend on which of two processes a noisy host slowed down.

    python bench/bench_compile_options.py [-m MODEL.gguf] --options '{"cpp_wrapper": false}' [--reps 6] [--tokens 128]

Reports ms per token (min and median over --reps alternations of --tokens greedy tokens, batch 1, seed API) and
whether the two steps gave the same logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF file or model folder (default: SmolLM2-135M Q4_1)")
    p.add_argument("--options", required=True, help="JSON: inductor options to change for the second step")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args(argv)
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from exllamav2.default_models import smollm2_gguf_path
    changed = json.loads(args.options)
    cfg = ExLlamaV2Config(args.model or smollm2_gguf_path())
    cfg.max_seq_len = 512
    cfg.max_input_len = min(cfg.max_input_len, 512)
    model = ExLlamaV2(cfg)
    model.load()
    cache = ExLlamaV2Cache(model, batch_size=1, max_seq_len=512)
    runners = {"default": model.compile_decode(max_seq_len=512),
               f"with {changed}": model.compile_decode(max_seq_len=512, options=changed)}
    ids = torch.arange(1, 9).view(1, 8)

    def run():
        cache.current_seq_len = 0
        tok = model.forward(ids, cache, last_id_only=True)[:, -1].argmax(-1, keepdim=True)
        logits = []
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            lg = model.forward(tok, cache)[:, -1]
            tok = lg.argmax(-1, keepdim=True)
            logits.append(lg)
        return (time.perf_counter() - t0) / args.tokens * 1e3, torch.cat(logits)

    times = {k: [] for k in runners}
    last = {}
    for _ in range(args.reps):
        for name, runner in runners.items():
            model.decode_runner = runner
            t, last[name] = run()
            times[name].append(t)
    print(f"{args.model or 'SmolLM2-135M Q4_1'}: ms per token, batch 1, {args.tokens} tokens, {args.reps} alternations, "
          f"{torch.get_num_threads()} threads")
    for name, v in times.items():
        print(f"  {name}: min {min(v):.3f}, median {statistics.median(v):.3f}")
    a, b = last.values()
    print(f"  same logits: {torch.equal(a, b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
