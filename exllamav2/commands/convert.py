"""`python -m exllamav2 convert -i MODEL_DIR -o OUT_DIR -b 4.0`: quantize an HF model folder to EXL2 (or, with
--gptq, to 4-bit GPTQ g128) with calibration on the CPU or GPU. Interrupted jobs resume when run again with the
same settings."""

from __future__ import annotations

import argparse

NAME = "convert"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="quantize an HF model folder to EXL2 (or GPTQ)",
                              description=__doc__.split(":", 1)[1].strip())
    p.add_argument("-i", "--in_dir", required=True, help="input HF model folder (config.json + safetensors)")
    p.add_argument("-o", "--out_dir", required=True, help="output model folder (created)")
    p.add_argument("-b", "--bits", type=float, default=4.0,
                   help="target bits per weight over the decoder layers, 1.5-16 (default 4.0; above 8.08 the linears "
                        "whose 8-bit error costs most stay fp16)")
    p.add_argument("-hb", "--head_bits", type=int, default=6, choices=[2, 3, 4, 5, 6, 8], help="bits of the output head (default 6)")
    p.add_argument("-c", "--cal_dataset", default=None, help="calibration text file (default: the built-in text)")
    p.add_argument("-r", "--dataset_rows", type=int, default=16, help="calibration rows (default 16)")
    p.add_argument("-l", "--length", type=int, default=512, help="tokens per calibration row (default 512)")
    p.add_argument("--gptq", action="store_true", help="write plain GPTQ 4-bit g128 act-order decoder layers instead of EXL2")
    p.add_argument("--work-dir", dest="work_dir", default=None, help="job folder (default: OUT_DIR/.convert_job)")
    p.add_argument("-nr", "--no_resume", action="store_true", help="start over, ignoring an existing job in the work folder")
    p.add_argument("--keep-work", dest="keep_work", action="store_true", help="keep the job folder after finishing")
    p.add_argument("-ss", "--shard_size", type=int, default=8192, help="output shard size in MB (0: one file)")
    p.add_argument("-m", "--measurement", default=None, help="reuse a measurement.json instead of measuring")
    p.add_argument("-om", "--output_measurement", default=None, help="also write the measurement to this file")
    p.add_argument("--batch-rows", dest="batch_rows", type=int, default=4, help="calibration rows per forward pass")
    p.add_argument("--no-sensitivity", dest="sensitivity", action="store_false",
                   help="allocate bits by relative output error alone (skips the one pass that loads the whole "
                        "unquantized model to weigh errors by their effect on the loss)")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ damping as a fraction of the Hessian's mean diagonal (default: 0.01 for targets under "
                        "5 bpw, 0.1 from 5 bpw; smaller fits the calibration text more closely). A measurement "
                        "reused with -m keeps the bit allocation scored at its own damping")
    p.add_argument("--no-fp-target", dest="fp_target", action="store_false",
                   help="quantize each layer to reproduce its own outputs on the partly quantized model's inputs (plain "
                        "GPTQ) instead of the unquantized model's outputs (the default, which also corrects the "
                        "error of the layers before it)")
    p.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream before quantizing (RMSNorm pre-norm models): an exactly "
                        "equivalent model whose weights quantize very differently; it halves the loss of uniform "
                        "4-bit (--gptq) on SmolLM2 but not of the EXL2 bit allocation (see bench/README_QUANT.md). "
                        "The converted model's residual stream is in rotated coordinates (the matrix is saved with "
                        "it) and LoRA adapters made for the original model do not apply to it")
    return p


def run(args) -> int:
    from ..conversion import ConvertSettings, convert_exl2

    s = ConvertSettings(in_dir=args.in_dir, out_dir=args.out_dir, bits=args.bits, head_bits=args.head_bits,
                        calibration=args.cal_dataset, rows=args.dataset_rows, length=args.length, gptq=args.gptq,
                        work_dir=args.work_dir, batch_rows=args.batch_rows, shard_mb=args.shard_size,
                        measurement=args.measurement, save_measurement=args.output_measurement,
                        sensitivity=args.sensitivity, damp=args.damp, fp_target=args.fp_target,
                        rotate=args.rotate)
    summary = convert_exl2(s, resume=not args.no_resume, progress=True, keep_work=args.keep_work)
    kind = "GPTQ 4-bit g128" if args.gptq else f"EXL2 target {args.bits}"
    print(f"{kind}: decoder layers {summary['bpw']:.3f} bpw, head {summary['head_bpw']:.3f} bpw -> {args.out_dir}")
    return 0
