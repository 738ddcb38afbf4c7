"""`python -m exllamav2 ppl FILE`: perplexity of a text file under the model, over sliding windows."""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import CLIError, add_model_args, load_model, requires_bos, status

NAME = "ppl"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="perplexity of a text file", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--length", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--stride", type=int, default=512, help="window step in tokens (default: 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="start each window with BOS (auto: when the architecture requires it)")
    add_model_args(p, max_seq_len=None)
    return p


def run(args) -> int:
    from exllamav2.perplexity import model_logits_fn, perplexity

    if not os.path.isfile(args.file):
        raise CLIError(f"text file not found: {args.file}")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.length <= 1 or args.stride <= 0:
        raise CLIError(f"--length must be > 1 and --stride > 0, got {args.length} and {args.stride}")
    config, model, _, tokenizer = load_model(args, need_cache=False, max_seq_len=args.length)
    ids = tokenizer.encode(text)[0]
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    if ids.shape[0] < 2:
        raise CLIError(f"{args.file}: fewer than 2 tokens of text")
    use_bos = requires_bos(config) if args.bos == "auto" else args.bos == "yes"
    if use_bos and tokenizer.bos_token_id is None:
        raise CLIError("--bos: the tokenizer has no BOS token")
    status(args, f"Scoring {ids.shape[0]} tokens (window {args.length}, stride {args.stride}"
                 f"{', BOS per window' if use_bos else ''}) ...")
    t0 = time.perf_counter()
    result = perplexity(model_logits_fn(model), ids, args.length, args.stride,
                        bos_token_id=tokenizer.bos_token_id if use_bos else None,
                        progress=not args.quiet and sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    print(f"Perplexity: {result.perplexity:.4f}")
    status(args, f"[{result.scored_tokens} tokens scored in {result.windows} windows, mean NLL {result.mean_nll:.4f}, "
                 f"{elapsed:.1f} s]")
    return 0
