"""Probing SmolLM2: capture the residual stream at every layer while generating, then fit a linear probe
(least squares) that tells a sentence's topic from one layer's last-token residual, and report its held-out
accuracy per layer.

    python examples/probing.py --tokens 8
"""

from __future__ import annotations

import argparse
import sys

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.interventions import add_capture, last_token_activations
from exllamav2.tokenizer import ExLlamaV2Tokenizer

ANIMALS = ["The dog barked at the", "A cat climbed the tall", "The horse ran across the", "My rabbit likes to eat",
           "The lion hunted in the", "A small bird sang in the"]
FOOD = ["I cooked pasta with tomato", "She baked a chocolate cake for", "We ate fresh bread and cheese at",
        "He ordered a pizza with extra", "The soup was made with carrots", "They grilled fish and rice for"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens to generate in the capture demo")
    ap.add_argument("--layers", default="0,8,15,22,29", help="comma-separated layers to probe")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ExLlamaV2Config(args.model or smollm2_gguf_path())
    cfg.max_seq_len = 256
    model = ExLlamaV2(cfg)
    model.load()
    tokenizer = ExLlamaV2Tokenizer(cfg)
    layers = [int(x) for x in args.layers.split(",")]

    # 1) capture during cached generation: residuals of the generated positions at each chosen layer
    ids = tokenizer.encode("Once upon a time, there was a")
    cache = ExLlamaV2Cache(model, max_seq_len=cfg.max_seq_len)
    points = [f"blocks.{i}.resid_post" for i in layers]
    with add_capture(model, points, positions="generated") as cap:
        model.forward(ids[:, :-1], cache, preprocess_only=True)
        tok, out = ids[:, -1:], []
        for _ in range(args.tokens):
            tok = model.forward(tok, cache)[:, -1:].argmax(-1)
            out.append(tok)
    print("generated:", tokenizer.decode(torch.cat(out, 1)[0]))
    for p in points:
        r = cap[p]
        print(f"  {p}: {tuple(r.values.shape)} steps {r.steps.tolist()[:4]}... mean norm {r.values.norm(dim=-1).mean():.1f}")

    # 2) a linear probe per layer: animals (+1) vs food (-1), leave-one-pair-out accuracy
    acts = last_token_activations(model, tokenizer, ANIMALS + FOOD, points)
    y = torch.tensor([1.0] * len(ANIMALS) + [-1.0] * len(FOOD))
    n = len(ANIMALS)
    for p in points:
        x = acts[p]
        correct = 0
        for k in range(n):
            test = [k, n + k]
            train = [i for i in range(2 * n) if i not in test]
            mu = x[train].mean(0)
            xt = torch.cat([x[train] - mu, torch.ones(len(train), 1)], 1)
            w = torch.linalg.lstsq(xt, y[train].unsqueeze(1), driver="gelsd").solution
            pred = torch.cat([x[test] - mu, torch.ones(2, 1)], 1) @ w
            correct += int((pred.squeeze(1).sign() == y[test]).sum())
        print(f"probe {p}: held-out accuracy {correct}/{2 * n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
