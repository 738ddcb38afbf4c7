"""Speculative decoding in the dynamic generator: decode tokens/s of one greedy job without drafts, with n-gram
drafts, and with a draft model, on a repetitive prompt (the model is asked to copy a paragraph, so its output
repeats its context). One process, one table; each mode's output is checked equal to the plain job's.

    python bench/bench_speculative.py [-m MODEL] [--tokens 256] [--num-draft-tokens 4] [--draft-layers 8]

The draft model is the main model's first `--draft-layers` layers (self-speculation: the default SmolLM2-135M
has no smaller model with its vocabulary), or `--draft-model PATH` for a real one. Decode time runs from the
first streamed token to the last, so the prompt's prefill is not counted. The default run measures SmolLM2 in
its default weights (the GGUF's int4 blocks packed, bf16 activations), eager forward, one CPU thread per
`--threads`.
"""

from __future__ import annotations

import argparse
import time

import torch

TEXT = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in long strips. Every night "
        "the keeper climbed the spiral stairs, lit the lamp and watched the ships pass far below. In winter the "
        "storms came in from the west and the waves broke against the rocks so hard that the whole tower shook, "
        "but the lamp never went out, and the ships always found their way home.")


def load(path: str | None, max_seq_len: int, layers: int | None = None):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.default_models import smollm2_gguf_path

    cfg = ExLlamaV2Config(path or smollm2_gguf_path())
    cfg.max_seq_len = max_seq_len
    if layers is not None:
        if not 0 < layers <= cfg.num_hidden_layers:
            raise SystemExit(f"--draft-layers must lie in 1..{cfg.num_hidden_layers}, got {layers}")
        cfg.num_hidden_layers = layers
    model = ExLlamaV2(cfg)
    model.load()
    return model, ExLlamaV2Tokenizer(cfg)


def decode(model, tok, ids, tokens: int, cache_len: int, **spec) -> dict:
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler

    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, cache_len), tok, **spec)
    job = ExLlamaV2DynamicJob(ids, tokens, gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                              stop_conditions=tok.eos_token_ids)
    gen.enqueue(job)
    t0 = first = None
    last: dict = {}
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["stage"] == "streaming" and first is None:
                t0, first = time.perf_counter(), len(job.new_token_ids)
            if r.get("eos"):
                last = r
    dt = time.perf_counter() - t0
    acc, rej = last.get("accepted_draft_tokens", 0), last.get("rejected_draft_tokens", 0)
    return {"tokens": list(job.new_token_ids), "tps": (len(job.new_token_ids) - first) / dt,
            "acceptance": acc / (acc + rej) if acc + rej else None, "drafted": acc + rej,
            "forwards": gen.num_forwards}


def main() -> None:
    ap = argparse.ArgumentParser(description="speculative decoding speed-up in the dynamic generator")
    ap.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=256, help="most new tokens per run (it also stops at EOS)")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--max-ngram", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=8, help="self-speculation: the draft is the first N layers")
    ap.add_argument("--draft-model", default=None, help="a draft model folder or .gguf (same vocabulary)")
    ap.add_argument("--reps", type=int, default=2, help="runs per mode; the best is reported")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cache_len = 2048
    model, tok = load(args.model, cache_len)
    draft, _ = load(args.draft_model or args.model, cache_len, None if args.draft_model else args.draft_layers)
    draft_name = args.draft_model or f"first {args.draft_layers} of {model.config.num_hidden_layers} layers"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Repeat this text word for word, three times:"
                                                                  f"\n\n{TEXT}"}])
    ids = tok.encode(prompt, encode_special_tokens=True)
    k = args.num_draft_tokens
    modes = [("plain", {}),
             (f"n-gram (k={k}, max_ngram={args.max_ngram})",
              {"use_ngram_draft": True, "num_draft_tokens": k, "max_ngram": args.max_ngram}),
             (f"draft model (k={k}; {draft_name})", {"draft_model": draft, "num_draft_tokens": k})]

    decode(model, tok, ids, 8, cache_len)  # warm-up
    results: dict = {}
    for _ in range(args.reps):  # modes interleaved, so machine noise hits them alike
        for name, spec in modes:
            r = decode(model, tok, ids, args.tokens, cache_len, **spec)
            if name not in results or r["tps"] > results[name]["tps"]:
                results[name] = r
    base = results["plain"]
    print(f"\nspeculative decoding, {getattr(model.config, 'config_source', '')}\nprompt {ids.shape[1]} tokens, "
          f"{len(base['tokens'])} new tokens, greedy, {torch.get_num_threads()} threads, best of {args.reps}\n")
    print(f"{'mode':<52} {'tok/s':>8} {'speed-up':>9} {'accepted':>9} {'drafted':>8} {'forwards':>9} {'same':>5}")
    for name, _ in modes:
        r = results[name]
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        same = "yes" if r["tokens"] == base["tokens"] else "NO"
        print(f"{name:<52} {r['tps']:>8.1f} {r['tps'] / base['tps']:>8.2f}x {acc:>9} {r['drafted']:>8} "
              f"{r['forwards']:>9} {same:>5}")
    if any(results[n]["tokens"] != base["tokens"] for n, _ in modes):
        raise SystemExit("a speculative run's output differs from the plain run's")


if __name__ == "__main__":
    main()
