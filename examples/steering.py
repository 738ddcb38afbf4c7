"""Steering SmolLM2 with a contrastive vector: build a direction at one layer from positive and negative prompts,
save it as safetensors, then generate with the streaming generator with and without it.

    python examples/steering.py --layer 15 --scale 4 --tokens 24 --save /tmp/happy.safetensors
"""

from __future__ import annotations

import argparse
import sys

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.generator import ExLlamaV2StreamingGenerator
from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.interventions import SteeringVectors, contrastive_steering
from exllamav2.tokenizer import ExLlamaV2Tokenizer

POSITIVE = ["I love this, it is wonderful and", "What a great, happy day, I feel", "This is excellent, amazing and",
            "I am so glad and delighted that"]
NEGATIVE = ["I hate this, it is awful and", "What a terrible, sad day, I feel", "This is horrible, disgusting and",
            "I am so angry and upset that"]


def complete(gen, tokenizer, prompt: str, tokens: int) -> str:
    gen.begin_stream_ex(tokenizer.encode(prompt), ExLlamaV2Sampler.Settings.greedy(), max_new_tokens=tokens)
    text = ""
    while True:
        r = gen.stream_ex()
        text += r["chunk"]
        if r["eos"]:
            return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle one)")
    ap.add_argument("--point", default="resid_post", help="block point to steer (default resid_post)")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt", default="The movie I watched yesterday was")
    ap.add_argument("--save", default=None, help="write the steering vector here (.safetensors)")
    ap.add_argument("--load", default=None, help="use a saved steering vector instead of building one")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ExLlamaV2Config(args.model or smollm2_gguf_path())
    cfg.max_seq_len = 512
    model = ExLlamaV2(cfg)
    model.load()
    tokenizer = ExLlamaV2Tokenizer(cfg)
    layer = cfg.num_hidden_layers // 2 if args.layer is None else args.layer

    if args.load:
        vectors = SteeringVectors.load(args.load)
        layer = vectors.layers[0] if layer not in vectors.vectors else layer
    else:
        vectors = contrastive_steering(model, tokenizer, POSITIVE, NEGATIVE, layers=[layer], point=args.point)
    print(f"steering vector: layer {layer}, point {vectors.point}, norm {vectors.vectors[layer].norm():.2f}")
    if args.save:
        vectors.save(args.save)
        print(f"saved to {args.save}")

    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=cfg.max_seq_len), tokenizer)
    print(f"\nunsteered: {args.prompt}{complete(gen, tokenizer, args.prompt, args.tokens)}")
    for scale in (args.scale, -args.scale):
        with vectors.register(model, layers=[layer], scale=scale):
            print(f"scale {scale:+g}: {args.prompt}{complete(gen, tokenizer, args.prompt, args.tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
