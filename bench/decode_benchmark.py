"""Side-by-side CPU decode benchmark, interleaved over repetitions in one process; medians and ratios.

Every "ours" figure goes through the public API, the way a user's code does:

- seed API loop: `model.forward(prompt, cache, last_id_only=True)`, then one `model.forward(tok, cache)` per
  token with greedy argmax. Rows for the default weights (a GGUF's Q4_0/Q4_1/Q8_0 blocks kept packed, int4 CPU
  kernel) and for the dense bf16 weights (`config.gguf_dequantize = True`), each eager and, with --compile,
  compiled (`model.compile_decode()`, after which every plain one-token forward runs the compiled step).
- generators on the default weights: `ExLlamaV2BaseGenerator.generate_simple`, `ExLlamaV2StreamingGenerator`
  and `ExLlamaV2DynamicGenerator`, greedy, never stopping early. Their decode rate is N tokens over the time from
  the first generated token to the last (prefill excluded); "vs loop" is the ratio to the seed-API loop row of
  the same weights and mode.
- HF transformers bf16 from the same GGUF, driven by the same loop (past_key_values, one token per forward).
- llama.cpp (when `llama_cpp` imports) on the shipped GGUF and on Q4_0 / BF16 requantizations.

Columns: decode tok/s (batch 1, N tokens after an 8-token prompt); prefill tok/s (one P-token prompt,
last-position logits); batch-B tok/s (B rows of one token each per forward); first-token ms (a 64-token prompt
to its first token); RSS added by building the row's engine; attained weight bandwidth (weight bytes read per
decode step x decode tok/s) against torch.sum over a 512 MiB buffer.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from bench_engines import (  # bench/ is on sys.path when run as a script
    BaseGenEngine, DynamicGenEngine, Engine, GeneratorEngine, HFEngine, Inputs, LlamaCppEngine, LoopEngine, RunnerProbe,
    SeedLoop, StreamingGenEngine, make_inputs, requantize_gguf)

BF16 = torch.bfloat16


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_bandwidth_gbs(mib: int = 512, reps: int = 5) -> float:
    buf = torch.ones(mib * 2 ** 20 // 4, dtype=torch.float32)
    torch.sum(buf)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.sum(buf)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------- weight bytes

def _kernel_bytes(k) -> int | None:
    """Bytes a prepared linear kernel reads per call; None when the kernel cannot say."""
    if k is None or k is False:
        return None
    w = getattr(k, "weight", None)
    if isinstance(w, torch.Tensor):          # dense kernels run on the module's own weight
        n = w.numel() * w.element_size()
        b = getattr(k, "bias", None)
        return n + (b.numel() * b.element_size() if isinstance(b, torch.Tensor) else 0)
    n = k.nbytes() if hasattr(k, "nbytes") else 0
    return n or None


def _linear_bytes(lin, dtype) -> int:
    try:
        b = _kernel_bytes(lin.kernel(dtype))
    except Exception:
        b = None
    if b is not None:
        return b
    q = lin.q_handle
    packed = getattr(q, "packed", None) if q is not None else None
    if packed is not None:
        return packed.nbytes()
    w = lin.weight
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return lin.in_features * lin.out_features * 2


def _group_bytes(group, parts, dtype) -> int:
    k = group.kernel(dtype) if group is not None else False
    b = _kernel_bytes(k)
    if b is not None:
        return b
    return sum(_linear_bytes(p, dtype) for p in parts)


def weight_bytes_per_step(model) -> int:
    """Weight bytes one decode step reads: every linear's kernel (fused q/k/v and gate/up as one), and the head.
    The embedding is a row lookup and is not counted."""
    from exllamav2.attn import ExLlamaV2Attention
    from exllamav2.linear import ExLlamaV2Linear
    from exllamav2.mlp import ExLlamaV2MLP
    dtype = model.dtype
    total = 0
    for m in model.modules:
        if isinstance(m, ExLlamaV2Attention):
            total += _group_bytes(getattr(m, "qkv", None), [m.q_proj, m.k_proj, m.v_proj], dtype)
            total += _linear_bytes(m.o_proj, dtype)
        elif isinstance(m, ExLlamaV2MLP):
            parts = [p for p in (getattr(m, "gate_proj", None), m.up_proj) if p is not None]
            total += _group_bytes(getattr(m, "gate_up", None), parts, dtype)
            total += _linear_bytes(m.down_proj, dtype)
        elif isinstance(m, ExLlamaV2Linear):     # the head
            total += _linear_bytes(m, dtype)
        else:                                    # other block kinds (MoE, parallel decoder): their linears
            for sub in getattr(m, "submodules", []):
                if isinstance(sub, ExLlamaV2Linear):
                    total += _linear_bytes(sub, dtype)
    return total


# ---------------------------------------------------------------------------------------------- building

@dataclass
class Result:
    name: str
    ref: str | None = None
    decode: list = field(default_factory=list)
    prefill: list = field(default_factory=list)
    batch: list = field(default_factory=list)
    first_token_ms: list = field(default_factory=list)
    rss_mb: float = 0.0
    weight_bytes: int = 0

    def med(self, key):
        v = [x for x in getattr(self, key) if x is not None]
        return statistics.median(v) if v else None


def _gguf_type(model) -> str | None:
    """The GGUF block type of the first attention's q_proj (what "default weights" are), or None."""
    from exllamav2.attn import ExLlamaV2Attention
    cfg = model.config
    if not cfg.gguf_path:
        return None
    for m in model.modules:
        if isinstance(m, ExLlamaV2Attention):
            key = m.q_proj.key + ".weight"
            src = cfg.tensor_file_map.get(key)
            try:
                return src.ggml_type(key) if src is not None else None
            except Exception:
                return None
    return None


def _describe_default(model) -> str:
    from exllamav2.attn import ExLlamaV2Attention
    gt = _gguf_type(model)
    if gt is None:
        return "default weights"
    packed = any(isinstance(m, ExLlamaV2Attention) and m.q_proj.q_handle is not None for m in model.modules)
    return f"default weights (GGUF {gt} {'packed' if packed else 'dense'})"


class Bench:
    def __init__(self, log=print):
        self.log = log
        self.engines: list[Engine] = []
        self.results: list[Result] = []
        self.notes: dict[str, str] = {}
        self.compile_seconds: dict[str, float] = {}

    def add(self, make):
        gc.collect()
        before = rss_mb()
        e = make()
        self.engines.append(e)
        self.results.append(Result(e.name, ref=e.ref, rss_mb=rss_mb() - before, weight_bytes=e.weight_bytes))
        self.log(f"  built {e.name} (+{self.results[-1].rss_mb:.0f} MB RSS)")
        return e


def build_engines(model_path: str, compile: bool, hf: bool, llamacpp: bool, generators: bool, threads: int,
                  max_len: int, prefill_len: int, batch: int, log=print) -> tuple[Bench, Inputs]:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from exllamav2.tokenizer import ExLlamaV2Tokenizer

    bench = Bench(log)
    batch_sizes = tuple(sorted({1, batch}))
    inputs = None
    default_model = None

    for kind in ("default", "bf16"):
        cfg = ExLlamaV2Config(model_path)
        if kind == "bf16":
            if not cfg.gguf_path:
                bench.notes["ours bf16"] = "not a separate row: the model is not a GGUF, its default weights are these"
                continue
            cfg.gguf_dequantize = True
        cfg.max_seq_len = max_len
        cfg.max_input_len = min(cfg.max_input_len, max_len)
        holder = {}

        def load():
            model = ExLlamaV2(cfg)
            model.load()
            holder["model"] = model
            holder["caches"] = {b: ExLlamaV2Cache(model, batch_size=b, max_seq_len=max_len) for b in batch_sizes}
            label = _describe_default(model) if kind == "default" else "bf16 (dequantized)"
            holder["label"] = label
            return SeedLoop(f"ours {label} seed API eager", model, None, holder["caches"],
                            weight_bytes_per_step(model))

        eager = bench.add(load)
        model, caches = holder["model"], holder["caches"]
        if inputs is None:
            tokenizer = ExLlamaV2Tokenizer(cfg)
            inputs = make_inputs(tokenizer, cfg.vocab_size, prefill_len, batch)
        runner = None
        if compile:
            def comp():
                r = model.compile_decode(batch_sizes=batch_sizes, max_seq_len=max_len, progress=True)
                model.decode_runner = None
                bench.compile_seconds[holder["label"]] = r.compile_seconds
                holder["runner"] = r
                return SeedLoop(f"ours {holder['label']} seed API compiled", model, r, caches, eager.weight_bytes)
            bench.add(comp)
            runner = holder["runner"]
        if kind == "default":
            default_model = (model, cfg, caches, eager, runner)

    if generators and default_model is not None:
        model, cfg, caches, eager, runner = default_model
        tokenizer = ExLlamaV2Tokenizer(cfg)
        page = 256 if max_len % 256 == 0 else 16
        modes = [("eager", None)] + ([("compiled", runner)] if runner is not None else [])
        dyn_cache = {}
        for mode, r in modes:
            ref = next(e.name for e in bench.engines if isinstance(e, SeedLoop) and e.model is model
                       and (e.runner is None) == (r is None))
            for gname, make in (
                    ("base generator (generate_simple)",
                     lambda n, r=r, ref=ref: BaseGenEngine(n, model, r, ref, eager.weight_bytes, caches[1], tokenizer)),
                    ("streaming generator",
                     lambda n, r=r, ref=ref: StreamingGenEngine(n, model, r, ref, eager.weight_bytes, caches[1],
                                                                tokenizer)),
                    ("dynamic generator",
                     lambda n, r=r, ref=ref: DynamicGenEngine(
                         n, model, r, ref, eager.weight_bytes,
                         dyn_cache.setdefault("c", ExLlamaV2Cache(model, batch_size=1, max_seq_len=max_len)),
                         tokenizer, page))):
                bench.add(lambda: make(f"ours {gname} {mode}"))
        bench.notes.update(probe_generators(bench, model, inputs))

    gguf = default_model[1].gguf_path if default_model is not None else None
    if hf:
        if gguf:
            try:
                bench.add(lambda: HFEngine(gguf))
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                bench.notes["HF"] = f"skipped: {type(e).__name__}: {first}"
        else:
            bench.notes["HF"] = "skipped: the HF reference loads GGUF models only here"
    else:
        bench.notes["HF"] = "skipped (--no-hf)"
    if llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            bench.notes["llama.cpp"] = "skipped: llama_cpp is not importable (pip install llama-cpp-python)"
        else:
            if not gguf:
                bench.notes["llama.cpp"] = "skipped: not a GGUF model"
            else:
                shipped = _gguf_type(default_model[0]) or "GGUF"
                bench.add(lambda: LlamaCppEngine(gguf, f"{shipped} (as shipped)", threads, max_len))
                cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "exllamav2", "bench")
                os.makedirs(cache_dir, exist_ok=True)
                stem = os.path.splitext(os.path.basename(gguf))[0]
                for label, ftype in (("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("BF16", "LLAMA_FTYPE_MOSTLY_BF16")):
                    if label == shipped:
                        continue
                    path = requantize_gguf(gguf, os.path.join(cache_dir, f"{stem}.{label}.gguf"), ftype)
                    if path:
                        bench.add(lambda: LlamaCppEngine(path, f"{label} (requantized)", threads, max_len))
                    else:
                        bench.notes[f"llama.cpp {label}"] = "requantization failed"
    else:
        bench.notes["llama.cpp"] = "skipped (--no-llamacpp)"
    return bench, inputs


def probe_generators(bench: Bench, model, inputs: Inputs) -> dict:
    """Which generators' decode steps reach model.forward's decode-runner path (the one --compile compiles)."""
    notes = {}
    saved = model.decode_runner
    try:
        for e in bench.engines:
            if not isinstance(e, GeneratorEngine) or e.runner is not None:
                continue
            probe = RunnerProbe(model)
            model.decode_runner = probe
            e.decode(inputs, 3)
            kind = e.name.removeprefix("ours ").removesuffix(" eager")
            if probe.asked == 0:
                notes[f"decode path, {kind}"] = ("never calls model.forward (it runs its own paged forward); "
                                                 "compiled, its decode steps run the runner's compiled paged step "
                                                 "(runtime/paged_decode.py)")
            else:
                notes[f"decode path, {kind}"] = (f"{probe.applied} of its {probe.asked} model.forward calls took the "
                                                 f"decode-runner path (the one --compile compiles)")
    finally:
        model.decode_runner = saved
    return notes


# ---------------------------------------------------------------------------------------------- running

def run_benchmark(model_path: str, compile: bool = False, hf: bool = True, llamacpp: bool = True,
                  generators: bool = True, threads: int | None = None, reps: int = 3, new_tokens: int = 128,
                  prefill_len: int = 512, batch: int = 8, log=print) -> dict:
    from exllamav2.runtime.threads import configure_threads
    threads = configure_threads(threads)
    log(f"threads: {threads}; measuring memory bandwidth ...")
    bw = measure_bandwidth_gbs()
    log(f"bandwidth: {bw:.1f} GB/s (torch.sum over 512 MiB fp32)")
    need = max(prefill_len, 64 + 2, 8 + new_tokens + 2, 8 + max(16, new_tokens // 4)) + 8
    max_len = -(-need // 256) * 256      # a whole number of the dynamic generator's pages
    bench, inputs = build_engines(model_path, compile, hf, llamacpp, generators, threads, max_len, prefill_len,
                                  batch, log)
    batch_tokens = max(16, new_tokens // 4)
    log("warming up ...")
    for e in bench.engines:
        e.activate()
        e.decode(inputs, 4)
        e.first_token(inputs)
        if isinstance(e, LoopEngine):
            e.prefill(inputs)
            e.batch_decode(inputs, 2)
    graphs_before = _compiled_graphs()
    for r in range(reps):
        for e, res in zip(bench.engines, bench.results):
            e.activate()
            res.decode.append(e.decode(inputs, new_tokens))
            res.prefill.append(e.prefill(inputs))
            res.first_token_ms.append(e.first_token(inputs))
            res.batch.append(e.batch_decode(inputs, batch_tokens))
        log(f"  repetition {r + 1}/{reps} done")
    if compile and _compiled_graphs() > graphs_before:
        bench.notes["recompiles"] = (f"{_compiled_graphs() - graphs_before} graph(s) compiled during the timed "
                                     "repetitions (after the warm-up): the compiled rows include compile time")
    return {"bandwidth_gbs": bw, "threads": threads, "results": bench.results, "notes": bench.notes,
            "compile_seconds": bench.compile_seconds, "reps": reps, "new_tokens": new_tokens,
            "prefill_len": prefill_len, "batch": batch, "max_len": max_len, "peak_rss_mb": peak_rss_mb()}


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


# ---------------------------------------------------------------------------------------------- report

def _f(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _find(res: list[Result], prefix: str, suffix: str) -> Result | None:
    return next((r for r in res if r.name.startswith(prefix) and r.name.endswith(suffix)), None)


def format_table(report: dict) -> str:
    res, bw = report["results"], report["bandwidth_gbs"]
    by_name = {r.name: r for r in res}
    hf = by_name.get("HF transformers bf16")
    hf_d = hf.med("decode") if hf else None
    lcpp = [r for r in res if r.name.startswith("llama.cpp")]
    head = ["engine", "decode tok/s", "vs loop", f"prefill-{report['prefill_len']} tok/s",
            f"batch-{report['batch']} tok/s", "first token ms", "+RSS MB", "GB/s (% of bw)", "decode vs HF bf16"]
    head += [f"decode vs {r.name}" for r in lcpp]
    rows = []
    for r in res:
        d = r.med("decode")
        ref = by_name.get(r.ref) if r.ref else None
        gbs = r.weight_bytes * d / 1e9 if d else 0
        row = [r.name, _f(d), _ratio(d, ref.med("decode")) if ref else "-", _f(r.med("prefill")), _f(r.med("batch")),
               _f(r.med("first_token_ms")), f"{r.rss_mb:.0f}", f"{gbs:.1f} ({100 * gbs / bw:.0f}%)",
               _ratio(d, hf_d)]
        row += [_ratio(d, ref_.med("decode")) for ref_ in lcpp]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
    lines.append("")

    # the ratios, in words
    eager = _find(res, "ours default weights", "seed API eager")
    comp = _find(res, "ours default weights", "seed API compiled")
    if eager is None:
        eager, comp = _find(res, "ours ", "seed API eager"), _find(res, "ours ", "seed API compiled")
    if eager is not None:
        e_hf = _ratio(eager.med("decode"), hf_d) if hf_d else "- (no HF row)"
        c_hf = (_ratio(comp.med("decode"), hf_d) if hf_d else "- (no HF row)") if comp else "- (not run: --compile)"
        lines.append(f"seed API, default weights: {e_hf} HF bf16 eager, {c_hf} compiled (targets >= 3x and >= 4x)")
    for mode in ("eager", "compiled"):
        gens = [(label, _find(res, f"ours {key}", f" {mode}"))
                for label, key in (("base", "base generator"), ("streaming", "streaming generator"),
                                   ("dynamic", "dynamic generator"))]
        gens = [(label, g) for label, g in gens if g is not None]
        if not gens:
            continue
        parts = []
        for label, g in gens:
            ref = by_name.get(g.ref)
            d, rd = g.med("decode"), ref.med("decode") if ref else None
            parts.append(f"{label} {100 * d / rd:.0f}%" if d and rd else f"{label} -")
        lines.append(f"generators vs the seed-API loop ({mode}): {', '.join(parts)} (target within 10%)")
    if hf:
        for r in res:
            if r.name.startswith("ours") and "seed API" in r.name and r.med("prefill") and hf.med("prefill"):
                lines.append(f"prefill-{report['prefill_len']} {r.name}: {_ratio(r.med('prefill'), hf.med('prefill'))} "
                             f"HF bf16")
    for label, s in report.get("compile_seconds", {}).items():
        lines.append(f"compile: {label}: {s:.0f} s (model.compile_decode, batch sizes 1 and {report['batch']}, "
                     f"max_seq_len {report['max_len']})")
    lines.append(f"\nmedians of {report['reps']} interleaved repetitions; {report['new_tokens']} decoded tokens; "
                 f"{report['threads']} threads; bandwidth {bw:.1f} GB/s; process peak RSS "
                 f"{report['peak_rss_mb']:.0f} MB")
    for k, v in report["notes"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)
