"""Our EXL2 quantizer against llama.cpp's quantizations at equal bits, from the same source model (issue #22).

Any HF model folder in (default: SmolLM2-135M-Instruct, dequantized from its shipped GGUF to fp16). The folder is
written as an F16 GGUF (exllamav2/conversion/gguf_export.py) and quantized by llama.cpp's `llama-quantize
--allow-requantize` to each preset (Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0); each file's bpw is measured over
the decoder linears; our EXL2 is converted at each of those bpw (plus --bits). Every model is scored by this engine
in fp32 on two held-out texts of different kinds, prose and code, neither in the calibration text: the GGUF files
dequantized to fp32 folders, the EXL2 folders as they load. One table: bpw, perplexity per text, change against the
source, conversion time and peak memory.

Results are cached per row in --work (results.json), so an interrupted run resumes and a rerun only prints.
llama-quantize comes from bench/setup_llamacpp.sh; without it the llama.cpp rows are skipped with a message.
Full run (SmolLM2, about 1.5 hours on 2 shared cores): python bench/quant_peers.py --work /tmp/quant_peers
Quick run: python bench/quant_peers.py --tokens 1024 --points Q4_0 --work /tmp/quant_peers_quick
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_quality import load_model  # noqa: E402

from exllamav2 import ExLlamaV2Config  # noqa: E402
from exllamav2.conversion.gguf_export import gguf_decoder_bpw, write_f16_gguf  # noqa: E402
from exllamav2.tokenizer import ExLlamaV2Tokenizer  # noqa: E402

POINTS = ("Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
DEFAULT_LLAMA_QUANTIZE = os.path.join(os.path.expanduser("~"), ".cache", "exllamav2", "llama.cpp", "bin",
                                      "llama-quantize")
# Held-out texts, checked absent from exllamav2/conversion/calibration_default.txt: Newton's Opticks (English prose;
# shipped as libbacktrace test data in apache-tvm-ffi, a torch dependency here), falling back to the GPL-3 text;
# Python's own argparse.py for code.
PROSE_CANDIDATES = (("tvm_ffi", "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"),
                    (None, "/usr/share/common-licenses/GPL-3"))
CODE_CANDIDATES = ((None, os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")),)


def find_text(candidates) -> str | None:
    import importlib.util
    for package, rel in candidates:
        if package is None:
            path = rel
        else:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                continue
            path = os.path.join(list(spec.submodule_search_locations)[0], rel)
        if os.path.isfile(path):
            return path
    return None


def llama_quantize_missing(path: str) -> str | None:
    """Why the llama.cpp rows cannot be made (None when llama-quantize is usable)."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return None
    return (f"llama.cpp rows skipped: llama-quantize not found at {path} (build it with bench/setup_llamacpp.sh, "
            "or pass --llama-quantize PATH)")


def text_ids(tokenizer, path: str, tokens: int, kind: str) -> torch.Tensor:
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = tokenizer.encode(f.read())[:, :tokens]
    if ids.shape[-1] < tokens:
        raise ValueError(f"{path}: the {kind} text has {ids.shape[-1]} tokens, fewer than --tokens {tokens}; "
                         f"pass a longer --{kind} file or fewer --tokens")
    return ids


def run_child(argv: list[str]) -> tuple[int, float, float, str]:
    """Run a command; (return code, seconds, peak RSS in MiB, its output's tail)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, usage.ru_maxrss / 1024, out[-2000:]


def _convert_worker(kwargs: dict, queue) -> None:
    from exllamav2.conversion import ConvertSettings, convert_exl2
    layer_times: list[float] = []
    layer_cpu: list[float] = []
    last = [time.time(), time.process_time()]

    def on_step(stage: str, index: int) -> None:
        now = [time.time(), time.process_time()]
        if stage == "quant":  # wall time, and CPU time (all threads), which a shared machine's load does not inflate
            layer_times.append(now[0] - last[0])
            layer_cpu.append(now[1] - last[1])
        last[:] = now

    t0 = time.time()
    try:
        summary = convert_exl2(ConvertSettings(**kwargs), progress=True, on_step=on_step)
    except BaseException as e:  # reported to the parent, which names the run
        import traceback
        queue.put({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
        return
    queue.put({"summary": {k: summary[k] for k in ("bpw", "head_bpw", "strategy")}, "seconds": time.time() - t0,
               "quant_seconds_per_module": sum(layer_times[1:]) / max(1, len(layer_times) - 1),
               "quant_cpu_seconds_per_module": sum(layer_cpu[1:]) / max(1, len(layer_cpu) - 1),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def convert_in_child(kwargs: dict) -> dict:
    """One EXL2 conversion in a fresh process, so its time and peak memory are its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_convert_worker, args=(kwargs, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"EXL2 conversion to {kwargs['out_dir']} at {kwargs['bits']} bpw failed: {result['error']}")
    return result


class Results:
    """Rows cached in <work>/results.json, keyed by label and by what the scores depend on."""

    def __init__(self, path: str, key: dict):
        self.path, self.key = path, json.dumps(key, sort_keys=True)
        self.rows: dict = {}
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("key") == self.key:
                self.rows = saved["rows"]
        # each row is also kept in its own file, so a row is never lost to another run's rewrite of results.json
        self.row_dir = os.path.join(os.path.dirname(path), "rows")
        if os.path.isdir(self.row_dir):
            for name in sorted(os.listdir(self.row_dir)):
                with open(os.path.join(self.row_dir, name)) as f:
                    saved = json.load(f)
                if saved.get("key") == self.key:
                    self.rows.setdefault(saved["label"], saved["row"])

    def put(self, label: str, row: dict) -> None:
        """Store one row; rows that other runs on the same --work stored meanwhile are kept (read under a lock)."""
        import fcntl
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.isfile(self.path):
                with open(self.path) as f:
                    saved = json.load(f)
                if saved.get("key") == self.key:  # the file is newer than what this run loaded at its start
                    self.rows = {**self.rows, **saved["rows"]}
            self.rows[label] = row
            os.makedirs(self.row_dir, exist_ok=True)
            row_file = os.path.join(self.row_dir, label.replace(" ", "_").replace("/", "_") + ".json")
            with open(row_file + ".tmp", "w") as f:
                json.dump({"key": self.key, "label": label, "row": row}, f, indent=1)
            os.replace(row_file + ".tmp", row_file)
            with open(self.path + ".tmp", "w") as f:
                json.dump({"key": self.key, "rows": self.rows}, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def source_folder(args) -> str:
    if args.model:
        return args.model
    from exllamav2.default_models import smollm2_gguf_path
    from exllamav2.gguf import convert_gguf_to_hf
    out = os.path.join(args.work, "source_hf")
    if not os.path.isfile(os.path.join(out, "config.json")):
        print("source: SmolLM2-135M-Instruct dequantized from its GGUF to fp16", flush=True)
        convert_gguf_to_hf(smollm2_gguf_path(), out, dtype=torch.float16)
    return out


@torch.inference_mode()
def score(folder: str, texts: dict, window: int) -> dict:
    """fp32 perplexity of a model folder on each text, in consecutive windows (as quant_quality.perplexity_of).
    Through the `torch` backend: the cpu backend's GEMV rounds activations to int8 per 32 columns (as llama.cpp
    does), which would score the kernel with the quantization; the reference math scores the weights alone."""
    from tqdm.auto import tqdm
    from exllamav2.ops import use_backend
    with use_backend("torch"):
        return _score(folder, texts, window, tqdm)


def _score(folder: str, texts: dict, window: int, tqdm) -> dict:
    model = load_model(folder, window, torch.float32)
    try:
        out = {}
        for kind, ids in texts.items():
            nll, count = 0.0, 0
            starts = [a for a in range(0, ids.shape[-1] - 1, window) if ids[:, a:a + window + 1].shape[-1] >= 2]
            for a in tqdm(starts, desc=f"scoring {kind}", unit="window", leave=False):
                chunk = ids[:, a:a + window + 1]
                logits = model.forward(chunk[:, :-1]).float()
                nll -= float(torch.log_softmax(logits, -1).gather(-1, chunk[:, 1:].unsqueeze(-1)).sum())
                count += chunk.shape[-1] - 1
            out[kind] = math.exp(nll / count)
        return out
    finally:
        model.unload()


def llamacpp_rows(args, src: str, texts: dict, results: Results) -> None:
    from exllamav2.gguf import convert_gguf_to_hf
    f16 = os.path.join(args.work, "gguf", "source-F16.gguf")
    if not os.path.isfile(f16):
        print(f"writing {f16}", flush=True)
        write_f16_gguf(src, f16 + ".part", progress=True)
        os.replace(f16 + ".part", f16)
    for point in args.points:
        label = f"llama.cpp {point}"
        if label in results.rows:
            continue
        out = os.path.join(args.work, "gguf", f"source-{point}.gguf")
        print(f"[{label}] llama-quantize", flush=True)
        rc, took, rss, tail = run_child([args.llama_quantize, "--allow-requantize", f16, out + ".part", point,
                                         str(args.threads)])
        if rc != 0:
            raise RuntimeError(f"llama-quantize {point} failed (exit {rc}):\n{tail}")
        os.replace(out + ".part", out)
        bpw, types = gguf_decoder_bpw(out)
        deq = os.path.join(args.work, "gguf", f"deq-{point}")
        convert_gguf_to_hf(out, deq, dtype=torch.float32, progress=False)
        print(f"[{label}] {bpw:.3f} bpw ({types}); scoring", flush=True)
        ppl = score(deq, texts, args.window)
        results.put(label, {"bpw": bpw, "ppl": ppl, "seconds": took, "peak_rss_mib": rss, "types": types,
                            "modules": None})
        print(f"[{label}] {fmt_ppl(ppl)}", flush=True)


def exl2_rows(args, src: str, texts: dict, results: Results, targets: list[float]) -> None:
    from exllamav2.conversion.adaptive_gptq import damp_for_target
    modules = 2 * ExLlamaV2Config(src).num_hidden_layers
    suffix = (" rotated" if args.rotate else "") + (f" damp{args.damp:g}" if args.damp is not None else "")
    for bits in targets:
        label = f"EXL2 {bits:.2f}{suffix}"
        if label in results.rows:
            continue
        out = os.path.join(args.work, "exl2", f"{bits:.2f}{suffix.replace(' ', '_')}")
        damp = args.damp if args.damp is not None else damp_for_target(bits)
        measurement = os.path.join(args.work, "exl2", f"measurement_damp{damp}"
                                                      f"{'_rotated' if args.rotate else ''}.json")
        reuse = os.path.isfile(measurement)
        done_file = os.path.join(out, "quant_peers_conversion.json")  # a finished conversion not yet scored
        if os.path.isfile(done_file):
            with open(done_file) as f:
                r = json.load(f)
            reuse = not r["measured"]
            print(f"[{label}] converted earlier ({out})", flush=True)
        else:
            print(f"[{label}] converting ({'reusing ' + measurement if reuse else 'measuring first'})", flush=True)
            r = convert_in_child(dict(in_dir=src, out_dir=out, bits=bits, head_bits=args.head_bits, rows=args.rows,
                                      length=args.length, rotate=args.rotate, damp=args.damp,
                                      measurement=measurement if reuse else None,
                                      save_measurement=None if reuse else measurement))
            with open(done_file, "w") as f:
                json.dump({**r, "measured": not reuse}, f)
        print(f"[{label}] {r['summary']['bpw']:.3f} bpw; scoring", flush=True)
        ppl = score(out, texts, args.window)
        results.put(label, {"bpw": r["summary"]["bpw"], "ppl": ppl, "seconds": r["seconds"], "measured": not reuse,
                            "seconds_per_module": r["quant_seconds_per_module"], "modules": modules,
                            "cpu_seconds_per_module": r["quant_cpu_seconds_per_module"],
                            "peak_rss_mib": r["peak_rss_mib"], "head_bpw": r["summary"]["head_bpw"]})
        print(f"[{label}] {fmt_ppl(ppl)}", flush=True)


def fmt_ppl(ppl: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())


def table(results: Results, kinds: list[str]) -> str:
    base = results.rows["source"]["ppl"]
    head = ["quantization", "bpw"] + [f"ppl {k}" for k in kinds] + [f"Δ {k}" for k in kinds] + [
        "convert time", "s per module", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(results.rows.items(), key=lambda kv: (kv[0] != "source", kv[1]["bpw"], kv[0]))
    for label, r in order:
        cells = [label, f"{r['bpw']:.3f}"] + [f"{r['ppl'][k]:.3f}" for k in kinds]
        cells += ["-" if label == "source" else f"{100 * (r['ppl'][k] / base[k] - 1):+.2f}%" for k in kinds]
        if label == "source":
            cells += ["-", "-", "-"]
        else:
            per, cpu = r.get("seconds_per_module"), r.get("cpu_seconds_per_module")
            cells += [f"{r['seconds']:.0f} s" + (" (incl. measuring)" if r.get("measured") else ""),
                      "-" if per is None else f"{per:.1f} s" + ("" if cpu is None else f" ({cpu:.1f} s CPU)"),
                      f"{r['peak_rss_mib']:.0f} MiB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exl2_variant(label: str) -> str:
    """'EXL2 4.63 rotated' -> 'rotated'; '' for the plain conversion."""
    return " ".join(label.split()[2:])


def verdicts(results: Results, kinds: list[str], tolerance: float = 0.05) -> list[str]:
    """For each llama.cpp row and each EXL2 variant (plain, rotated): the variant's row closest in bpw (within
    ±tolerance) and whether it wins on every text."""
    out = []
    for label, r in results.rows.items():
        if not label.startswith("llama.cpp"):
            continue
        near = [(l, e) for l, e in results.rows.items() if l.startswith("EXL2") and abs(e["bpw"] - r["bpw"]) <= tolerance]
        if not near:
            out.append(f"{label} ({r['bpw']:.3f} bpw): no EXL2 row within ±{tolerance}")
            continue
        for variant in sorted({exl2_variant(l) for l, _ in near}):
            mine = [(l, e) for l, e in near if exl2_variant(l) == variant]
            l, e = min(mine, key=lambda le: abs(le[1]["bpw"] - r["bpw"]))
            worse = [k for k in kinds if e["ppl"][k] >= r["ppl"][k]]
            gaps = ", ".join(f"{k} {100 * (e['ppl'][k] / r['ppl'][k] - 1):+.2f}%" for k in kinds)
            out.append(f"{l} vs {label}: {'WINS' if not worse else 'LOSES'} ({gaps} perplexity vs llama.cpp)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="HF model folder (default: SmolLM2-135M-Instruct from its GGUF)")
    ap.add_argument("--work", default="/tmp/exl2_quant_peers", help="folder for the converted models and results")
    ap.add_argument("--llama-quantize", default=DEFAULT_LLAMA_QUANTIZE, help="path of llama.cpp's llama-quantize")
    ap.add_argument("--points", nargs="*", default=list(POINTS), help=f"llama.cpp presets (default: {' '.join(POINTS)})")
    ap.add_argument("--bits", nargs="*", type=float, default=[], help="extra EXL2 targets (bpw)")
    ap.add_argument("--no-exl2", action="store_true", help="only the source and llama.cpp rows")
    ap.add_argument("--rotate", action="store_true",
                    help="EXL2 rows converted with --rotate (rows labelled 'rotated'; their own measurement)")
    ap.add_argument("--prose", default=find_text(PROSE_CANDIDATES), help="held-out prose text file")
    ap.add_argument("--code", default=find_text(CODE_CANDIDATES), help="held-out code text file")
    ap.add_argument("--damp", type=float, default=None,
                    help="GPTQ damping for the EXL2 rows (default: by target, as convert; rows labelled 'dampD')")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens scored per text")
    ap.add_argument("--window", type=int, default=1024, help="scoring window (tokens)")
    ap.add_argument("--rows", type=int, default=16, help="EXL2 calibration rows")
    ap.add_argument("--length", type=int, default=512, help="EXL2 calibration row length")
    ap.add_argument("--head-bits", type=int, default=8, help="EXL2 head bits (llama.cpp keeps the head at 6-8 bits)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-quantize threads")
    args = ap.parse_args(argv)
    unknown = [p for p in args.points if p not in POINTS]
    if unknown:
        ap.error(f"--points: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(POINTS)}")
    for kind in ("prose", "code"):
        if getattr(args, kind) is None or not os.path.isfile(getattr(args, kind)):
            ap.error(f"--{kind}: no held-out {kind} text file found ({getattr(args, kind)}); pass one")
    os.makedirs(args.work, exist_ok=True)

    src = source_folder(args)
    tok = ExLlamaV2Tokenizer(ExLlamaV2Config(src))
    texts = {kind: text_ids(tok, getattr(args, kind), args.tokens, kind) for kind in ("prose", "code")}
    results = Results(os.path.join(args.work, "results.json"),
                      {"source": os.path.abspath(src), "prose": args.prose, "code": args.code, "tokens": args.tokens,
                       "window": args.window, "rows": args.rows, "length": args.length, "head_bits": args.head_bits})
    if "source" not in results.rows:
        print("[source] scoring", flush=True)
        results.put("source", {"bpw": 16.0, "ppl": score(src, texts, args.window)})
    print(f"[source] {fmt_ppl(results.rows['source']['ppl'])}", flush=True)

    why = llama_quantize_missing(args.llama_quantize)
    if why is not None:
        print(why, flush=True)
    elif args.points:
        llamacpp_rows(args, src, texts, results)
    targets = sorted({round(r["bpw"], 2) for l, r in results.rows.items() if l.startswith("llama.cpp")
                      and l.split()[-1] in args.points} | {round(b, 2) for b in args.bits})
    if not args.no_exl2:
        exl2_rows(args, src, texts, results, targets)

    kinds = list(texts)
    print(f"\nperplexity in fp32 on {args.tokens} tokens per text (windows of {args.window}); prose: "
          f"{os.path.basename(args.prose)}, code: {os.path.basename(args.code)}; bpw over the decoder linears")
    print(table(results, kinds))
    for line in verdicts(results, kinds):
        print(line)
    if why is not None:
        print(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
