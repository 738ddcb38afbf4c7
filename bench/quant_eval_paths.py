"""Where a converted model's perplexity loss comes from: the same quantized folders evaluated through each of the
engine's paths, against the unquantized source evaluated the same way.

- packed: the default CPU path (bf16 activations, torch's int4 kernel; EXL2 scales rounded to bf16);
- dense: bf16 activations, dense matmul on the reference dequantisation (fp16 products, as the original);
- fp32: fp32 activations, reference dequantisation at fp32;
- fp32, unquantized head: as fp32, with the head taken from the source model (separates head and decoder loss;
  not for models converted with --rotate, whose head reads rotated states).

Run: python bench/quant_eval_paths.py --source HF_DIR QUANT_DIR [QUANT_DIR ...] [--text FILE] [--tokens N]
(for example with the folders bench/quant_quality.py leaves in its --work folder).
"""

from __future__ import annotations

import argparse
import os

import torch
from quant_quality import HELD_OUT, load_model, perplexity_of

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.tokenizer import ExLlamaV2Tokenizer

MODES = ("packed", "dense", "fp32", "fp32, unquantized head")


def load(model_dir: str, mode: str, source: ExLlamaV2Config, window: int) -> ExLlamaV2:
    model = load_model(model_dir, window, torch.float32 if mode.startswith("fp32") else None)
    for module in model.modules:
        for lin in [module] + list(getattr(module, "submodules", [])):
            q = getattr(lin, "q_handle", None)
            if q is None:
                continue
            if mode != "packed":
                q.packed = None          # dense matmul on the reference dequantisation
            if mode.startswith("fp32"):
                q.precision = torch.float32
            q.release_dense()
    if mode == "fp32, unquantized head":
        head = model.modules[model.head_layer_idx]
        # the head's own tensor, or the embedding it is tied to in the source
        names = [k + ".weight" for k in (head.key, model.modules[0].key)]
        name = next((n for n in names if n in source.tensor_file_map), None)
        if name is None:
            raise SystemExit(f"--source: none of {names} in {source.model_dir}")
        w = source.tensor_file_map[name].get_tensor(name, device="cpu").to(model.config.dtype)
        head.q_handle = None
        head.weight = torch.nn.Parameter(w[:head.out_features].contiguous(), requires_grad=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="the unquantized HF folder the models were converted from")
    ap.add_argument("models", nargs="+", help="converted model folders")
    ap.add_argument("--text", default=HELD_OUT)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()

    source = ExLlamaV2Config(args.source)
    with open(args.text, encoding="utf-8") as f:
        ids = ExLlamaV2Tokenizer(source).encode(f.read())[:, :args.tokens]
    print(f"{ids.shape[-1]} tokens of {os.path.basename(args.text)}, windows of {args.window}\n")
    print("| model | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    base = {}
    for m in ("packed", "fp32"):  # the source has no quantized weights: one bf16 and one fp32 figure serve all
        model = load(args.source, m, source, args.window)
        base[m] = perplexity_of(model, ids, args.window)
        model.unload()
    base["dense"], base["fp32, unquantized head"] = base["packed"], base["fp32"]
    print("| source | " + " | ".join(f"{base[m]:.3f}" for m in MODES) + " |", flush=True)
    for d in args.models:
        cells = []
        rotated = ExLlamaV2Config(d).residual_rotation
        for m in MODES:
            if rotated and m == "fp32, unquantized head":  # the source's head reads unrotated states
                cells.append("- (rotated)")
                continue
            model = load(d, m, source, args.window)
            p = perplexity_of(model, ids, args.window)
            model.unload()
            cells.append(f"{p:.3f} ({100 * (p / base[m] - 1):+.2f}%)")
        print(f"| {os.path.basename(os.path.normpath(d))} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
