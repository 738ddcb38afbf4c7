"""Where a decode step's time goes: torch.profiler's table of the ops over N single-token `model.forward` steps
(after an 8-token prompt), eager or through the compiled step (`model.compile_decode()`), 2 threads. Per-step
figures are the table's totals divided by N. Made for A/B runs of two trees:

    python bench/bench_decode_profile.py -m ~/.cache/exllamav2/bench/SmolLM2-135M-Instruct.Q4_1-Q4_0.gguf --compile
    PYTHONPATH=/tmp/before python bench/bench_decode_profile.py ...   # a worktree of another commit

Default model: the shipped SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--compile", action="store_true", help="profile the compiled decode step")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=12, help="rows of the table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from torch.profiler import profile

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from exllamav2.default_models import smollm2_gguf_path

    cfg = ExLlamaV2Config(args.model or smollm2_gguf_path())
    cfg.max_seq_len = 256 + args.steps
    model = ExLlamaV2(cfg)
    model.load()
    if args.compile:
        model.compile_decode()
    cache = ExLlamaV2Cache(model, max_seq_len=cfg.max_seq_len)
    tok = torch.tensor([[500]])
    with torch.inference_mode():
        model.forward(torch.randint(100, 20000, (1, 8), generator=torch.Generator().manual_seed(0)), cache,
                      last_id_only=True)
        for _ in range(20):   # warm-up
            model.forward(tok, cache, last_id_only=True)
        cache.current_seq_len = 8
        with profile() as prof:
            for _ in range(args.steps):
                model.forward(tok, cache, last_id_only=True)
    print(f"{cfg.gguf_path or cfg.model_dir}: {'compiled' if args.compile else 'eager'}, {args.steps} decode steps, "
          f"{args.threads} threads")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
