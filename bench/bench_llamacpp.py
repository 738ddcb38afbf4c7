"""Ours against llama.cpp's llama-bench on the same GGUF files, in one run: SmolLM2's Q4_1 as shipped and its
Q4_0 / Q8_0 / BF16 requantizations (made once with llama-quantize --allow-requantize, cached in
~/.cache/exllamav2/bench/). One markdown table of medians over interleaved repetitions.

    bench/setup_llamacpp.sh                     # builds llama-bench + llama-quantize once (~10+ min on 2 cores)
    python bench/bench_llamacpp.py --llama-bench ~/.cache/exllamav2/llama.cpp/bin/llama-bench [--compile]
           [-m MODEL.gguf] [--quants Q4_1,Q4_0,Q8_0,BF16,shipped] [--threads N] [--reps R] [--tokens N] [--prefill P]
           [--batch B] [--no-generators] [--int8-activations]

Ours, per file, through the public API (bench/bench_engines.py): the seed-API loop (`model.forward` per token,
greedy) eager and, with --compile, compiled (`model.compile_decode()`), plus the dynamic generator's decode rate.
With --int8-activations, the seed-API rows again with `ops.set_cpu_activations("int8")` (llama.cpp's own q8_0
activations: the precision llama-bench runs at; our default keeps a second int8 stage).
Columns: decode tok/s at batch 1 (N tokens after an 8-token prompt); batch-B tok/s (B rows per forward) and its
ratio to batch 1; prefill tok/s of one P-token prompt; attained weight bandwidth (bytes the linears read per step
x decode tok/s) against torch.sum over 512 MiB; and the ratio to llama.cpp on the same file (llama-bench `tg N`
and `pp P` with the same threads). The machine is shared in some settings: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_engines import DynamicGenEngine, SeedLoop, make_inputs  # noqa: E402
from decode_benchmark import measure_bandwidth_gbs, weight_bytes_per_step  # noqa: E402

QUANT_TYPES = ("Q4_1", "Q4_0", "Q8_0", "BF16")
CACHE = Path.home() / ".cache" / "exllamav2" / "bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gguf_type_of(path: str) -> str:
    """The type most of the file's 2-D weights use (what the file is 'in')."""
    from exllamav2.gguf.header import read_header
    counts: dict[str, int] = {}
    for t in read_header(path).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + t.n_elements
    return max(counts, key=counts.get)


def file_type_of(path: str) -> str:
    """The file's own type name (general.file_type, e.g. Q4_K_M: a mix of types), else its majority type."""
    from gguf import LlamaFileType
    from exllamav2.gguf.header import read_header
    field = read_header(path).fields.get("general.file_type")
    try:
        return LlamaFileType(int(field.value)).name.removeprefix("MOSTLY_")
    except (AttributeError, ValueError, TypeError):
        return gguf_type_of(path)


def requantize(quantize: str, src: str, qtype: str) -> str:
    dst = CACHE / f"{Path(src).stem}-{qtype}.gguf"
    if not dst.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"llama-quantize --allow-requantize {Path(src).name} -> {dst.name} ...")
        tmp = dst.with_suffix(".part")
        r = subprocess.run([quantize, "--allow-requantize", src, str(tmp), qtype], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-quantize failed for {qtype}: {(r.stderr or r.stdout).strip()[-400:]}")
        os.replace(tmp, dst)
    return str(dst)


def llama_bench(binary: str, path: str, threads: int, tokens: int, prefill: int) -> dict[str, float]:
    """{'decode': tok/s of `tg tokens`, 'prefill': tok/s of `pp prefill`} from one llama-bench run."""
    cmd = [binary, "-m", path, "-t", str(threads), "-p", str(prefill), "-n", str(tokens), "-r", "1", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {path}: {(r.stderr or r.stdout).strip()[-400:]}")
    out = {}
    for row in json.loads(r.stdout):
        if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            out["decode"] = float(row["avg_ts"])
        elif row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            out["prefill"] = float(row["avg_ts"])
    return out


class Ours:
    """Our rows for one file: the seed loop eager (and compiled), the dynamic generator."""

    def __init__(self, path: str, compile: bool, generators: bool, max_len: int, batch: int, int8: bool = False):
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
        from exllamav2.tokenizer import ExLlamaV2Tokenizer
        cfg = ExLlamaV2Config(path)
        cfg.max_seq_len = max_len
        cfg.max_input_len = min(cfg.max_input_len, max_len)
        self.model = ExLlamaV2(cfg)
        self.model.load()
        self.tokenizer = ExLlamaV2Tokenizer(cfg)
        sizes = sorted({1, batch})
        caches = {b: ExLlamaV2Cache(self.model, batch_size=b, max_seq_len=max_len) for b in sizes}
        self.weight_bytes = weight_bytes_per_step(self.model)
        self.rows = {"eager": SeedLoop("eager", self.model, None, caches, self.weight_bytes)}
        if compile:
            runner = self.model.compile_decode(batch_sizes=tuple(sizes), max_seq_len=max_len, progress=True)
            self.model.decode_runner = None
            self.rows["compiled"] = SeedLoop("compiled", self.model, runner, caches, self.weight_bytes)
        if int8:  # the same loops with llama.cpp's one-stage int8 activations (ops.set_cpu_activations)
            for mode, row in list(self.rows.items()):
                self.rows[f"{mode}, int8 act."] = SeedLoop(f"{mode}, int8 act.", self.model, row.runner, caches,
                                                           self.weight_bytes, activations="int8")
        self.generator = None
        if generators:
            best = self.rows.get("compiled", self.rows["eager"])
            self.generator = DynamicGenEngine("dynamic", self.model, best.runner, "", self.weight_bytes,
                                              ExLlamaV2Cache(self.model, batch_size=1, max_seq_len=max_len),
                                              self.tokenizer, 256 if max_len % 256 == 0 else 16)


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return "–" if a is None or not b else f"{a / b:.2f}x"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench (bench/setup_llamacpp.sh)")
    p.add_argument("--no-llamacpp", action="store_true",
                   help="ours only (no llama-bench yet): the shipped file, and requantizations when llama-quantize "
                        "is given")
    p.add_argument("--llama-quantize", default=None, help="path of llama-quantize (default: beside llama-bench)")
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--quants", default=",".join(QUANT_TYPES),
                   help=f"comma-separated: requantizations among {', '.join(QUANT_TYPES)} (the file itself where "
                        f"it is that type), and 'shipped': the file as given, named by its file type (Q4_K_M ...)")
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step (model.compile_decode)")
    p.add_argument("--int8-activations", action="store_true",
                   help="also our rows with ops.set_cpu_activations('int8'): llama.cpp's own q8_0 activation precision")
    p.add_argument("--no-generators", action="store_true", help="skip the dynamic generator row")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: usable cores)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)

    if args.llama_bench is None and not args.no_llamacpp:
        print("error: --llama-bench PATH is required (or --no-llamacpp for ours alone)", file=sys.stderr)
        return 2
    bench_bin = None if args.no_llamacpp else os.path.expanduser(args.llama_bench)
    quant_bin = args.llama_quantize or (bench_bin and os.path.join(os.path.dirname(bench_bin), "llama-quantize"))
    quant_bin = quant_bin and os.path.expanduser(quant_bin)
    for name, path in (("--llama-bench", bench_bin), ("--llama-quantize", quant_bin)):
        if path is not None and not os.access(path, os.X_OK):
            print(f"error: {name} {path} is not an executable (build it with bench/setup_llamacpp.sh)", file=sys.stderr)
            return 2
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANT_TYPES and q != "SHIPPED"]
    if bad or not quants:
        print(f"error: --quants {args.quants}: expected a comma-separated subset of {', '.join(QUANT_TYPES)} "
              f"and 'shipped' (the file as given)", file=sys.stderr)
        return 2
    src = args.model
    if src is None:
        from exllamav2.default_models import smollm2_gguf_path
        src = smollm2_gguf_path()
    elif not os.path.exists(src):
        print(f"error: model not found: {src}", file=sys.stderr)
        return 2

    from exllamav2.runtime.threads import configure_threads
    threads = configure_threads(args.threads)
    log(f"threads: {threads}; measuring memory bandwidth ...")
    bw = measure_bandwidth_gbs()
    log(f"bandwidth: {bw:.1f} GB/s (torch.sum over 512 MiB fp32)")
    shipped = gguf_type_of(src)
    files = {}
    for q in quants:
        if q == "SHIPPED":
            files[f"{file_type_of(src)} (shipped)"] = src
        elif q == shipped:
            files[q] = src
        elif quant_bin is not None:
            files[q] = requantize(quant_bin, src, q)
        else:
            log(f"skipping {q}: requantizing needs llama-quantize")
    quants = list(files)
    if not quants:
        print(f"error: the file is {shipped}; nothing to run without llama-quantize", file=sys.stderr)
        return 2

    max_len = -(-(max(args.prefill, 8 + args.tokens + 2) + 8) // 256) * 256
    ours, t_load = {}, {}
    for q, path in files.items():
        log(f"loading ours on {Path(path).name} ...")
        t0 = time.perf_counter()
        ours[q] = Ours(path, args.compile, not args.no_generators, max_len, args.batch, args.int8_activations)
        t_load[q] = time.perf_counter() - t0
    inputs = make_inputs(next(iter(ours.values())).tokenizer, ours[quants[0]].model.config.vocab_size,
                         args.prefill, args.batch)
    batch_tokens = max(16, args.tokens // 4)

    log("warming up ...")
    for o in ours.values():
        for row in o.rows.values():
            row.activate()
            row.decode(inputs, 4)
            row.prefill(inputs)
            row.batch_decode(inputs, 2)
        if o.generator:
            o.generator.activate()
            o.generator.decode(inputs, 4)
        o.model.decode_runner = None

    res: dict = {}
    for r in range(args.reps):
        for q in quants:
            o = ours[q]
            for mode, row in o.rows.items():
                row.activate()
                d = res.setdefault((q, mode), {"decode": [], "batch": [], "prefill": []})
                d["decode"].append(row.decode(inputs, args.tokens))
                d["batch"].append(row.batch_decode(inputs, batch_tokens))
                d["prefill"].append(row.prefill(inputs))
            if o.generator:
                o.generator.activate()
                res.setdefault((q, "dynamic generator"), {"decode": []})["decode"].append(
                    o.generator.decode(inputs, args.tokens))
            o.model.decode_runner = None
            lc = {}
            if bench_bin is not None:
                try:
                    lc = llama_bench(bench_bin, files[q], threads, args.tokens, args.prefill)
                except RuntimeError as e:
                    log(f"  {e}")
            d = res.setdefault((q, "llama.cpp"), {"decode": [], "prefill": []})
            d["decode"].append(lc.get("decode"))
            d["prefill"].append(lc.get("prefill"))
        log(f"  repetition {r + 1}/{args.reps} done")

    lines = [f"model: {src}", f"threads: {threads}; bandwidth {bw:.1f} GB/s; medians of {args.reps} interleaved "
             f"repetitions; decode = {args.tokens} tokens after an 8-token prompt; batch = {args.batch} rows; "
             f"prefill = {args.prefill} tokens", "",
             f"| file | engine | decode tok/s | vs llama.cpp | batch-{args.batch} tok/s | batch/1 | "
             f"prefill-{args.prefill} tok/s | vs llama.cpp | weights MB/step | attained GB/s | % of bandwidth |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in quants:
        lc = res[(q, "llama.cpp")]
        lc_dec, lc_pre = med(lc["decode"]), med(lc["prefill"])
        wb = ours[q].weight_bytes
        modes = ("eager", "compiled", "eager, int8 act.", "compiled, int8 act.", "dynamic generator")
        for mode in [m for m in modes if (q, m) in res]:
            d = res[(q, mode)]
            dec, bat, pre = med(d["decode"]), med(d.get("batch", [])), med(d.get("prefill", []))
            gbs = None if dec is None else wb * dec / 1e9
            lines.append(f"| {q} | ours {mode} | {fmt(dec)} | {ratio(dec, lc_dec)} | {fmt(bat)} | {ratio(bat, dec)} | "
                         f"{fmt(pre, 0)} | {ratio(pre, lc_pre)} | {wb / 1e6:.1f} | {fmt(gbs)} | "
                         f"{fmt(None if gbs is None else 100 * gbs / bw, 0)} |")
        if bench_bin is not None:
            lines.append(f"| {q} | llama.cpp | {fmt(lc_dec)} | 1.00x | – | – | {fmt(lc_pre, 0)} | 1.00x | – | – | – |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
