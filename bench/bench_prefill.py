"""Prefill time of one prompt through `model.forward(ids, cache, last_id_only=True)` on the CPU (as
bench_llamacpp.py and llama-bench's pp: the last position's logits), best of N, for each GGUF activation mode
(ops.set_cpu_activations: "int16", the default, and "int8", llama.cpp's precision). Made for A/B runs of two
trees, one process each, alternating:

    git worktree add /tmp/before <commit>
    for tree in /tmp/before . /tmp/before .; do
        PYTHONPATH=$tree python bench/bench_prefill.py -m ~/.cache/exllamav2/bench/SmolLM2-135M-Instruct.Q4_1-Q4_0.gguf
    done

Default model: the shipped SmolLM2-135M-Instruct GGUF. Prints one line: the file and the milliseconds per mode.
`--profile` then prints torch.profiler's table of the ops over one more prefill per mode (where the time goes).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=6, help="prefills per mode; the first is a warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print the ops' times over one prefill per mode")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops
    from exllamav2.default_models import smollm2_gguf_path

    path = args.model or smollm2_gguf_path()
    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = cfg.max_input_len = -(-args.tokens // 256) * 256
    model = ExLlamaV2(cfg)
    model.load()
    cache = ExLlamaV2Cache(model, batch_size=1, max_seq_len=cfg.max_seq_len)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    times = {}
    for mode in ("int16", "int8"):
        ops.set_cpu_activations(mode)
        ts = []
        for _ in range(args.reps):
            cache.current_seq_len = 0
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.forward(ids, cache, last_id_only=True)
            ts.append(time.perf_counter() - t0)
        times[mode] = min(ts[1:]) * 1000
    ops.set_cpu_activations("int16")
    print(path.split("/")[-1], " ".join(f"{m} {v:.1f} ms" for m, v in times.items()))
    if args.profile:
        from torch.profiler import profile
        for mode in ("int16", "int8"):
            ops.set_cpu_activations(mode)
            cache.current_seq_len = 0
            with profile() as prof, torch.inference_mode():
                model.forward(ids, cache, last_id_only=True)
            print(f"activations {mode}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        ops.set_cpu_activations("int16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
