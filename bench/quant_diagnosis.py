"""Diagnosis of requantization loss on SmolLM2-135M (the table "What limits EXL2 quality" in README_QUANT.md):
every decoder linear replaced by a perturbed or quantized copy, perplexity on 2048 tokens of GPL-3 ("gpl") and of
Python's argparse.py ("code") against the fp32 model. Run: python bench/quant_diagnosis.py [--only NAME ...]
(names: noise1, noise2.5, rtn8, rtn8_codes, rtn6, asym6, asym5_g32, sym5_g32, gptq6_mixed, gptq6_heldout,
gptq6_damp0.01 ... gptq6_damp10.0, gptq8_damp0.01, gptq8_damp0.1, gptq4_g32, gptq4_g128,
gptq4_g32_heldout, gptq4_g128_heldout)."""

from __future__ import annotations

import argparse as _argparse_module
import math
import os

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.conversion.adaptive_gptq import prepare_hessian, quantize_options
from exllamav2.conversion.calibration import calibration_ids, read_calibration_text
from exllamav2.conversion.qparams import QuantOption
from exllamav2.default_models import smollm2_gguf_path
from exllamav2.gguf import convert_gguf_to_hf
from exllamav2.tokenizer import ExLlamaV2Tokenizer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sym(W, bits, gs, scale_codes=False):
    """Round-to-nearest, symmetric, no clipping; optionally EXL2's 4-bit quadratic scale codes per group."""
    out, n = W.shape
    half = 1 << (bits - 1)
    Wg = W.reshape(out, n // gs, gs)
    s = torch.maximum(-Wg.amin(-1, keepdim=True) / half, Wg.amax(-1, keepdim=True) / (half - 1)).clamp(min=1e-12)
    if scale_codes:
        smax = s.amax(0, keepdim=True)
        s = torch.clamp(torch.ceil(torch.sqrt(s / smax) * 16), 1, 16) ** 2 * smax / 256
    q = torch.clamp(torch.round(Wg / s), -half, half - 1)
    return (q * s).reshape(out, n)


def asym(W, bits, gs):
    out, n = W.shape
    maxq = (1 << bits) - 1
    Wg = W.reshape(out, n // gs, gs)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    s = ((hi - lo) / maxq).clamp(min=1e-12)
    return (torch.clamp(torch.round((Wg - lo) / s), 0, maxq) * s + lo).reshape(out, n)


def main() -> None:
    ap = _argparse_module.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/exl2_quant_quality")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    hf_dir = os.path.join(args.work, "smollm2_hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        convert_gguf_to_hf(smollm2_gguf_path(), hf_dir, dtype=torch.bfloat16)
    cfg = ExLlamaV2Config(hf_dir)
    cfg.dtype, cfg.max_seq_len, cfg.max_input_len = torch.float32, 512, 512
    model = ExLlamaV2(cfg)
    model.load()
    tok = ExLlamaV2Tokenizer(cfg)
    evals = {"gpl": tok.encode(open("/usr/share/common-licenses/GPL-3").read())[:, :2048],
             "code": tok.encode(open(_argparse_module.__file__).read())[:, :2048]}
    linears = [getattr(m, p) for m in model.modules for p in PROJ if getattr(m, p, None) is not None]
    orig = {lin.key: lin.weight.data.clone() for lin in linears}

    @torch.inference_mode()
    def ppl(ids):
        nll, n = 0.0, 0
        for a in range(0, ids.shape[-1] - 1, 512):
            c = ids[:, a:a + 513]
            lp = torch.log_softmax(model.forward(c[:, :-1]).float(), -1)
            nll -= float(lp.gather(-1, c[:, 1:].unsqueeze(-1)).sum())
            n += c.shape[-1] - 1
        return math.exp(nll / n)

    def hessians(ids):
        H = {}
        wrapped = {}
        for lin in linears:
            def fw(x, *a, _lin=lin, _f=lin.forward, **k):
                X = x.reshape(-1, x.shape[-1]).float()
                H[_lin.key] = H.get(_lin.key, 0) + X.T @ X
                return _f(x, *a, **k)
            wrapped[lin] = fw
            lin.forward = fw
        with torch.inference_mode():
            for r in range(ids.shape[0]):
                model.forward(ids[r:r + 1])
        for lin in linears:
            del lin.forward
        return H

    def gptq(bits, H, damp=0.01, group=128):
        opt = QuantOption((bits,), (1.0,), group)
        return lambda lin: quantize_options(orig[lin.key], prepare_hessian(H[lin.key], damp), [opt])[0].dequant

    torch.manual_seed(0)
    mixed = lambda rows=16: hessians(calibration_ids(tok, read_calibration_text(None)[0], rows, 512))  # noqa: E731
    heldout = lambda: hessians(evals["gpl"].view(4, 512))  # noqa: E731
    configs = {
        "noise1": lambda: (lambda lin: orig[lin.key] + torch.randn_like(orig[lin.key]) * orig[lin.key].std() * 0.01),
        "noise2.5": lambda: (lambda lin: orig[lin.key] + torch.randn_like(orig[lin.key]) * orig[lin.key].std() * 0.025),
        "rtn8": lambda: (lambda lin: sym(orig[lin.key], 8, 64)),
        "rtn8_codes": lambda: (lambda lin: sym(orig[lin.key], 8, 64, scale_codes=True)),
        "rtn6": lambda: (lambda lin: sym(orig[lin.key], 6, 64)),
        "asym6": lambda: (lambda lin: asym(orig[lin.key], 6, 64)),
        "asym5_g32": lambda: (lambda lin: asym(orig[lin.key], 5, 32)),
        "sym5_g32": lambda: (lambda lin: sym(orig[lin.key], 5, 32)),
        "gptq6_mixed": lambda: gptq(6, mixed()),
        "gptq6_heldout": lambda: gptq(6, heldout()),
        # damping sweep: 6-bit g64 on the mixed calibration text, scored on the two unrelated texts
        **{f"gptq6_damp{d}": (lambda d=d: gptq(6, mixed(), d, 64)) for d in (0.01, 0.05, 0.1, 0.2, 0.5, 2.0, 10.0)},
        **{f"gptq8_damp{d}": (lambda d=d: gptq(8, mixed(), d, 64)) for d in (0.01, 0.1)},
        # 4-bit GPTQ on the mixed calibration text (damping 0.01, as the converter uses under 5 bpw)
        **{f"gptq4_g{g}": (lambda g=g: gptq(4, mixed(), 0.01, g)) for g in (32, 128)},
        # more calibration rows (the whole shipped text is about 98 rows of 512 tokens), two dampings
        **{f"gptq4_g128_rows{r}_damp{d}": (lambda r=r, d=d: gptq(4, mixed(r), d, 128))
           for r in (16, 48, 96) for d in (0.01, 0.1)},
        # calibrated on the scored gpl windows themselves: a bound no calibration text can beat on that text
        **{f"gptq4_g{g}_heldout": (lambda g=g: gptq(4, heldout(), 0.01, g)) for g in (32, 128)},
    }
    base = {k: ppl(v) for k, v in evals.items()}
    print("fp32: " + "  ".join(f"{k} {v:.4f}" for k, v in base.items()), flush=True)
    for name, make in configs.items():
        if args.only and name not in args.only:
            continue
        fn = make()
        for lin in linears:
            lin.weight.data.copy_(fn(lin))
        num = sum(float((lin.weight.data - orig[lin.key]).norm() ** 2) for lin in linears)
        den = sum(float(orig[lin.key].norm() ** 2) for lin in linears)
        res = {k: ppl(v) for k, v in evals.items()}
        for lin in linears:
            lin.weight.data.copy_(orig[lin.key])
        print(f"{name}: " + "  ".join(f"{k} {100 * (res[k] / base[k] - 1):+.2f}%" for k in res)
              + f"  weight rel. error {math.sqrt(num / den):.4f}", flush=True)


if __name__ == "__main__":
    main()
