"""Conversion cost per module: CPU seconds (all threads; a shared machine's load does not inflate them), wall
seconds and peak RSS of an EXL2 conversion stopped after N modules of one stage (measure or quant).

python bench/quant_convert_cost.py MODEL_DIR --stage quant --modules 4 --measurement M.json   # quantize stage
python bench/quant_convert_cost.py MODEL_DIR --stage measure --modules 3 --no-sensitivity     # measure stage
Module 0's figures include the job's start (tokenizing, embedding, optimizing); compare the later ones. Run it with
PYTHONPATH pointing at another checkout to compare two versions of the converter on the same machine.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="HF model folder")
    ap.add_argument("--stage", choices=("measure", "quant"), default="quant")
    ap.add_argument("--modules", type=int, default=4, help="stop after this many modules of the stage")
    ap.add_argument("--bits", type=float, default=4.5)
    ap.add_argument("--measurement", help="measurement.json to reuse (needed to reach the quantize stage quickly)")
    ap.add_argument("--no-sensitivity", action="store_true", help="measure without the loss-sensitivity pass")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args(argv)
    if args.modules < 1:
        ap.error("--modules must be at least 1")
    if args.stage == "quant" and not args.measurement:
        ap.error("--stage quant needs --measurement (else the whole measure stage runs first)")

    from exllamav2.conversion import ConvertSettings, convert_exl2
    last = [time.process_time(), time.time()]
    rows = []

    def on_step(stage: str, index: int) -> None:
        now = [time.process_time(), time.time()]
        if stage == args.stage:
            rows.append((index, now[0] - last[0], now[1] - last[1]))
            print(f"{stage} module {index}: {rows[-1][1]:.2f} s CPU, {rows[-1][2]:.2f} s wall", flush=True)
            if len(rows) >= args.modules:
                raise _Stop
        last[:] = now

    out = tempfile.mkdtemp(prefix="convert_cost_")
    try:
        convert_exl2(ConvertSettings(in_dir=args.model, out_dir=out, bits=args.bits, head_bits=8, rows=args.rows,
                                     length=args.length, measurement=args.measurement,
                                     sensitivity=not args.no_sensitivity), progress=False, on_step=on_step)
    except _Stop:
        pass
    finally:
        shutil.rmtree(out, ignore_errors=True)
    later = rows[1:] or rows
    print(f"mean over modules {later[0][0]}-{later[-1][0]}: {sum(r[1] for r in later) / len(later):.2f} s CPU, "
          f"{sum(r[2] for r in later) / len(later):.2f} s wall; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
