"""`python -m exllamav2 generate -p PROMPT`: continue a raw prompt (no chat template), streaming the text."""

from __future__ import annotations

import argparse
import sys
import time

from . import (CLIError, add_model_args, add_sampling_args, load_model, requires_bos,
               sampler_settings, status)

NAME = "generate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="complete a raw prompt", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("-p", "--prompt", required=True, help="the text to continue")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep going past the end-of-sequence token")
    add_model_args(p)
    add_sampling_args(p, temperature=0.8)
    return p


def encode_prompt(tokenizer, config, text: str):
    """Ids of `text` with special-token markup honoured, and BOS added when the architecture needs it."""
    import torch
    ids = tokenizer.encode(text, encode_special_tokens=True)
    bos = tokenizer.bos_token_id
    if requires_bos(config) and bos is not None and (ids.shape[-1] == 0 or int(ids[0, 0]) != bos):
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=-1)
    if ids.shape[-1] == 0:
        raise CLIError("the prompt is empty")
    return ids


def stream_completion(generator, ids, settings, max_tokens: int, seed, out=sys.stdout) -> dict:
    """Stream one completion to `out`; returns counts, timing and the text."""
    room = generator.cache.max_seq_len - ids.shape[-1]
    if room <= 0:
        raise CLIError(f"the prompt has {ids.shape[-1]} tokens, which fills the context "
                       f"(max_seq_len {generator.cache.max_seq_len}); raise --max-seq-len")
    t0 = time.perf_counter()
    generator.begin_stream_ex(ids, settings, max_new_tokens=min(max_tokens, room), seed=seed)
    t1 = time.perf_counter()
    parts, reason = [], None
    while True:
        r = generator.stream_ex()
        if r["chunk"]:
            out.write(r["chunk"])
            out.flush()
            parts.append(r["chunk"])
        if r["eos"]:
            reason = r["eos_reason"]
            break
    t2 = time.perf_counter()
    return {"text": "".join(parts), "new_tokens": generator.new_tokens, "prompt_tokens": ids.shape[-1],
            "prefill_s": t1 - t0, "decode_s": t2 - t1, "eos_reason": reason}


def report(args, stats: dict) -> None:
    rate = stats["new_tokens"] / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
    status(args, f"[{stats['prompt_tokens']} prompt tokens in {stats['prefill_s']:.2f} s, "
                 f"{stats['new_tokens']} new tokens at {rate:.1f} tokens/s, stop: {stats['eos_reason']}]")


def run(args) -> int:
    from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator

    if args.max_tokens <= 0:
        raise CLIError(f"--max-tokens must be positive, got {args.max_tokens}")
    config, model, cache, tokenizer = load_model(args)
    generator = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
    generator.set_stop_conditions(([] if args.no_eos_stop else list(tokenizer.eos_token_ids)) + list(args.stop))
    ids = encode_prompt(tokenizer, config, args.prompt)
    sys.stdout.write(args.prompt)
    stats = stream_completion(generator, ids, sampler_settings(args), args.max_tokens, args.seed)
    sys.stdout.write("\n")
    report(args, stats)
    return 0
