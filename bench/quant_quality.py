"""Quantization quality: SmolLM2-135M-Instruct converted by our EXL2 quantizer at 8.0 / 6.0 / 4.0 bpw and by our
GPTQ 4-bit g128 (act-order) mode, perplexity on a held-out text against the unquantized (bf16) model.

The unquantized model is the SmolLM2 GGUF dequantized to an HF folder (exllamav2.gguf.convert_gguf_to_hf); the
held-out text is the GPL-3 licence text (legal English, absent from the calibration text) unless --text is given.
Every model is evaluated by our engine on the CPU over the same token windows, with fp32 activations unless
--dtype bfloat16 (bf16 arithmetic adds its own noise of several tenths of a percent; bench/quant_eval_paths.py).
Writes the table to bench/README_QUANT.md. Slow (about half an hour on 2 shared cores).
Run: python bench/quant_quality.py [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.conversion import ConvertSettings, convert_exl2
from exllamav2.conversion.adaptive_gptq import damp_for_target
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.gguf import convert_gguf_to_hf
from exllamav2.tokenizer import ExLlamaV2Tokenizer

HELD_OUT = "/usr/share/common-licenses/GPL-3"
# (label, target bits, head bits, gptq, rotate, allowed perplexity increase)
RUNS = [("EXL2 4.0", 4.0, 6, False, False, 0.08), ("GPTQ 4-bit g128", 4.0, 6, True, False, None),
        ("EXL2 6.0", 6.0, 8, False, False, 0.015), ("EXL2 8.0", 8.0, 8, False, False, 0.003),
        ("EXL2 8.0 rotated", 8.0, 8, False, True, 0.003)]


@torch.inference_mode()
def perplexity_of(model: ExLlamaV2, ids: torch.Tensor, window: int) -> float:
    """Perplexity of a loaded model over ids (1, n), scored in consecutive windows of `window` tokens."""
    nll, count = 0.0, 0
    for a in range(0, ids.shape[-1] - 1, window):
        chunk = ids[:, a:a + window + 1]
        if chunk.shape[-1] < 2:
            break
        logits = model.forward(chunk[:, :-1]).float()
        lp = torch.log_softmax(logits, -1).gather(-1, chunk[:, 1:].unsqueeze(-1))
        nll -= float(lp.sum())
        count += chunk.shape[-1] - 1
    return math.exp(nll / count)


def load_model(model_dir: str, window: int, dtype: torch.dtype | None = None) -> ExLlamaV2:
    """A model folder loaded for scoring windows of `window` tokens; dtype: the activations' dtype (default: the
    engine's, bf16 on the CPU)."""
    cfg = ExLlamaV2Config(model_dir)
    if dtype is not None:
        cfg.dtype = dtype
    cfg.max_seq_len = window
    cfg.max_input_len = window
    model = ExLlamaV2(cfg)
    model.load()
    return model


def perplexity(model_dir: str, ids: torch.Tensor, window: int, dtype: torch.dtype | None = None) -> float:
    model = load_model(model_dir, window, dtype)
    try:
        return perplexity_of(model, ids, window)
    finally:
        model.unload()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/exl2_quant_quality", help="folder for the converted models")
    ap.add_argument("--text", default=HELD_OUT, help="held-out text file for perplexity")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to evaluate")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="activations' dtype for every perplexity (default float32: bf16 arithmetic alone moves a "
                         "quantized model's perplexity by several tenths of a percent, see quant_eval_paths.py)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--no-sensitivity", action="store_true",
                    help="allocate bits without the loss-sensitivity weighting (convert --no-sensitivity)")
    ap.add_argument("--damp", type=float, default=None,
                    help="GPTQ damping for every run (convert --damp); default: by target (adaptive_gptq.damp_for_target)")
    ap.add_argument("--no-fp-target", action="store_true",
                    help="quantize each layer against its own (partly quantized) inputs only (convert --no-fp-target)")
    ap.add_argument("--rotate", action="store_true", help="rotate the residual stream in every run (convert --rotate; "
                                                             "'EXL2 8.0 rotated' always does)")
    ap.add_argument("--only", nargs="*", help="run only these labels (e.g. 'EXL2 6.0'); the table keeps only them")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "README_QUANT.md"))
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    hf_dir = os.path.join(args.work, "smollm2_hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        convert_gguf_to_hf(smollm2_gguf_path(), hf_dir, dtype=torch.bfloat16)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = ExLlamaV2Tokenizer(ExLlamaV2Config(hf_dir)).encode(text)[:, :args.tokens]

    dtype = getattr(torch, args.dtype)
    base = perplexity(hf_dir, ids, args.window, dtype)
    print(f"unquantized: ppl {base:.4f}", flush=True)
    rows = []
    for label, bits, hb, gptq, rotate, allowed in RUNS:
        rotate = rotate or args.rotate
        if args.only and label not in args.only:
            continue
        out = os.path.join(args.work, label.replace(" ", "_").replace(".", "p"))
        # one measurement per damping (by default it depends on the target, see adaptive_gptq.damp_for_target)
        # and per calibration shape
        damp = args.damp if args.damp is not None else damp_for_target(bits)
        shape = "" if (args.rows, args.length) == (16, 512) else f"_rows{args.rows}x{args.length}"
        measurement = os.path.join(args.work, f"measurement{'_nosens' if args.no_sensitivity else ''}"
                                              f"{'_rot' if rotate else ''}{shape}_damp{damp}.json")
        s = ConvertSettings(hf_dir, out, bits=bits, head_bits=hb, gptq=gptq, rows=args.rows, length=args.length,
                            measurement=measurement if (os.path.isfile(measurement) and not gptq) else None,
                            save_measurement=None if gptq else measurement, sensitivity=not args.no_sensitivity,
                            damp=args.damp, fp_target=not args.no_fp_target, rotate=rotate)
        t0 = time.time()
        summary = convert_exl2(s, progress=True)
        took = time.time() - t0
        ppl = perplexity(out, ids, args.window, dtype)
        rows.append((label, bits if not gptq else None, hb, summary["bpw"], summary["head_bpw"], ppl, allowed, took))
        print(f"{label}: {summary['bpw']:.3f} bpw, ppl {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%), {took:.0f} s", flush=True)
        write_table(args, ids, base, rows)


def write_table(args, ids, base: float, rows: list) -> None:
    """The markdown table of the runs so far (rewritten after each run, so an interrupted bench keeps its results)."""
    lines = [
        "## Quantization quality (SmolLM2-135M-Instruct)",
        "",
        f"Perplexity of our engine ({args.dtype} activations, CPU) on {ids.shape[-1]} held-out tokens ({os.path.basename(args.text)}, "
        f"windows of {args.window}); calibration: the built-in text, {args.rows} rows x {args.length} tokens. "
        "The unquantized model is the Q4_1 GGUF dequantized to bf16. bpw counts the decoder layers' stored tensors "
        "(weights, scales, groups, permutation); the head is quantized separately at the head bits.",
        "",
        "| model | target bpw | measured bpw | head bits | perplexity | vs unquantized | allowed | convert time |",
        "|---|---|---|---|---|---|---|---|",
        f"| unquantized (bf16 weights) | - | 16 | - | {base:.3f} | - | - | - |",
    ]
    for label, bits, hb, bpw, head_bpw, ppl, allowed, took in rows:
        ok = "-" if allowed is None else f"{100 * allowed:.1f}% ({'pass' if ppl / base - 1 <= allowed else 'FAIL'})"
        lines.append(f"| {label} | {'-' if bits is None else bits} | {bpw:.3f} | {hb} ({head_bpw:.2f}) | {ppl:.3f} | "
                     f"{100 * (ppl / base - 1):+.2f}% | {ok} | {took:.0f} s |")
    by = {r[0]: r for r in rows}
    if "EXL2 4.0" in by and "GPTQ 4-bit g128" in by:
        e, g = by["EXL2 4.0"], by["GPTQ 4-bit g128"]
        lines += ["", f"EXL2 4.0 vs GPTQ 4-bit g128: perplexity {e[5]:.3f} vs {g[5]:.3f} "
                  f"({'no worse' if e[5] <= g[5] else 'WORSE'}), at {e[3]:.3f} vs {g[3]:.3f} bpw."]
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
