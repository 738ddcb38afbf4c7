"""Side-by-side CPU benchmark: our fast path, HF transformers (same GGUF, same dtype) and llama.cpp (when
`llama_cpp` imports), interleaved over several repetitions in one process; medians and ratios to references.

Measured per engine: decode tok/s (batch 1, N new tokens after a short prompt, forward + argmax loop),
prefill tok/s (one P-token prompt, last-position logits), batch-8 decode throughput, first-token latency
(a 64-token prompt to its first token), RSS added by building the engine, and attained weight bandwidth
(weight bytes read per decode step x decode tok/s) against torch.sum over a 512 MiB buffer.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

BF16 = torch.bfloat16


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure_bandwidth_gbs(mib: int = 512, reps: int = 5) -> float:
    buf = torch.ones(mib * 2 ** 20 // 4, dtype=torch.float32)
    torch.sum(buf)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.sum(buf)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------- engines

class Engine:
    name = ""
    weight_bytes = 0
    batch = True

    def prefill(self, ids: torch.Tensor) -> torch.Tensor: ...   # (b, s) -> last logits (b, vocab); resets state
    def step(self, ids: torch.Tensor) -> torch.Tensor: ...      # (b, 1) -> logits (b, vocab)


class OursEngine(Engine):
    def __init__(self, model, weights: str, compile: bool, max_len: int, batch: int):
        from . import FastDecoder
        self.fd = FastDecoder(model, max_seq_len=max_len, batch_size=batch, weights=weights, compile=compile)
        self.name = f"ours {self.fd.kind}{' compiled' if compile else ''}"
        self.weight_bytes = self.fd.weight_bytes()

    def prefill(self, ids):
        self.fd.reset()
        return self.fd(ids)[:, -1]

    def step(self, ids):
        return self.fd(ids)[:, -1]


class HFEngine(Engine):
    def __init__(self, gguf_path: str):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                          dtype=BF16).eval()
        self.name = "HF transformers bf16"
        n = sum(p.numel() for n_, p in self.model.named_parameters() if "embed_tokens" not in n_)
        if self.model.config.tie_word_embeddings:
            n += self.model.get_output_embeddings().weight.numel()
        self.weight_bytes = n * 2
        self.past = None

    @torch.inference_mode()
    def prefill(self, ids):
        from transformers import DynamicCache
        self.past = DynamicCache()
        out = self.model(ids, past_key_values=self.past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, ids):
        return self.model(ids, past_key_values=self.past, use_cache=True).logits[:, -1].float()


class LlamaCppEngine(Engine):
    batch = False

    def __init__(self, gguf_path: str, label: str, threads: int, max_len: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=gguf_path, n_ctx=max_len, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.name = f"llama.cpp {label}"
        self.weight_bytes = os.path.getsize(gguf_path)

    def _logits(self):
        import numpy as np
        return torch.from_numpy(np.asarray(self.llm.scores[self.llm.n_tokens - 1])).unsqueeze(0)

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return self._logits()

    def step(self, ids):
        self.llm.eval([int(ids[0, 0])])
        return self._logits()


def requantize_gguf(src: str, dst: str, ftype_name: str) -> str | None:
    """llama.cpp's quantizer (re-quantizing the shipped file); None when it fails."""
    import llama_cpp
    if os.path.exists(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    return dst if rc == 0 and os.path.exists(dst) else None


# ---------------------------------------------------------------------------------------------- measuring

@dataclass
class Result:
    name: str
    decode: list = field(default_factory=list)
    prefill: list = field(default_factory=list)
    batch8: list = field(default_factory=list)
    first_token_ms: list = field(default_factory=list)
    rss_mb: float = 0.0
    weight_bytes: int = 0

    def med(self, key):
        v = getattr(self, key)
        return statistics.median(v) if v else None


def time_decode(engine: Engine, vocab: int, new_tokens: int, batch: int = 1) -> float:
    ids = torch.randint(0, vocab, (batch, 8), generator=torch.Generator().manual_seed(1))
    tok = engine.prefill(ids).argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = engine.step(tok).argmax(-1, keepdim=True)
    return batch * new_tokens / (time.perf_counter() - t0)


def time_prefill(engine: Engine, vocab: int, n: int) -> float:
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    engine.prefill(ids).argmax(-1)
    return n / (time.perf_counter() - t0)


def time_first_token(engine: Engine, vocab: int, n: int = 64) -> float:
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(3))
    t0 = time.perf_counter()
    engine.prefill(ids).argmax(-1)
    return (time.perf_counter() - t0) * 1000


def build_engines(model_path: str, weights: list[str], compile: bool, hf: bool, llamacpp: bool, threads: int,
                  max_len: int, log=print) -> tuple[list, list, dict]:
    from .. import ExLlamaV2, ExLlamaV2Config
    engines, results, notes = [], [], {}

    def add(make):
        gc.collect()
        before = rss_mb()
        e = make()
        engines.append(e)
        results.append(Result(e.name, rss_mb=rss_mb() - before, weight_bytes=e.weight_bytes))
        log(f"  built {e.name} (+{results[-1].rss_mb:.0f} MB RSS)")

    cfg = ExLlamaV2Config(model_path)
    cfg.max_seq_len = max_len
    cfg.dtype = "bfloat16"
    model = ExLlamaV2(cfg)
    model.load()
    vocab = cfg.vocab_size
    for w in weights:
        for c in ([False, True] if compile else [False]):
            add(lambda: OursEngine(model, w, c, max_len, 8))
    gguf = cfg.gguf_path
    if hf:
        if gguf:
            add(lambda: HFEngine(gguf))
        else:
            notes["HF"] = "skipped: the HF reference loads GGUF models only here"
    if llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            notes["llama.cpp"] = "skipped: llama_cpp is not importable (pip install llama-cpp-python)"
        else:
            if not gguf:
                notes["llama.cpp"] = "skipped: not a GGUF model"
            else:
                shipped = model.config.tensor_file_map[model.modules[1].q_proj.key + ".weight"].ggml_type(
                    model.modules[1].q_proj.key + ".weight")
                add(lambda: LlamaCppEngine(gguf, f"{shipped} (as shipped)", threads, max_len))
                cache = os.path.join(os.path.expanduser("~"), ".cache", "exllamav2", "bench")
                os.makedirs(cache, exist_ok=True)
                stem = os.path.splitext(os.path.basename(gguf))[0]
                for label, ftype in (("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("BF16", "LLAMA_FTYPE_MOSTLY_BF16")):
                    if label == shipped:
                        continue
                    path = requantize_gguf(gguf, os.path.join(cache, f"{stem}.{label}.gguf"), ftype)
                    if path:
                        add(lambda: LlamaCppEngine(path, f"{label} (requantized)", threads, max_len))
                    else:
                        notes[f"llama.cpp {label}"] = "requantization failed"
    return engines, results, {"vocab": vocab, **notes}


def run_benchmark(model_path: str, weights=("bf16", "auto"), compile: bool = False, hf: bool = True,
                  llamacpp: bool = True, threads: int | None = None, reps: int = 3, new_tokens: int = 128,
                  prefill_len: int = 512, batch: int = 8, log=print) -> dict:
    from .threads import configure_threads
    threads = configure_threads(threads)
    log(f"threads: {threads}; measuring memory bandwidth ...")
    bw = measure_bandwidth_gbs()
    log(f"bandwidth: {bw:.1f} GB/s (torch.sum over 512 MiB fp32)")
    max_len = max(prefill_len, 64 + new_tokens, 8 + new_tokens) + 8
    engines, results, info = build_engines(model_path, list(weights), compile, hf, llamacpp, threads, max_len, log)
    vocab = info.pop("vocab")
    for e in engines:  # warm-up
        time_decode(e, vocab, 4)
        time_prefill(e, vocab, 64)
    for r in range(reps):
        for e, res in zip(engines, results):
            res.decode.append(time_decode(e, vocab, new_tokens))
            res.prefill.append(time_prefill(e, vocab, prefill_len))
            res.first_token_ms.append(time_first_token(e, vocab))
            if e.batch and batch > 1:
                res.batch8.append(time_decode(e, vocab, max(16, new_tokens // 4), batch))
        log(f"  repetition {r + 1}/{reps} done")
    return {"bandwidth_gbs": bw, "threads": threads, "results": results, "notes": info, "reps": reps,
            "new_tokens": new_tokens, "prefill_len": prefill_len, "batch": batch,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_table(report: dict) -> str:
    res, bw = report["results"], report["bandwidth_gbs"]
    refs = [r for r in res if not r.name.startswith("ours")]
    head = ["engine", "decode tok/s", "prefill tok/s", f"batch-{report['batch']} tok/s", "first token ms",
            "+RSS MB", "GB/s (% of bw)"] + [f"decode vs {r.name}" for r in refs]
    rows = []
    for r in res:
        d = r.med("decode")
        gbs = r.weight_bytes * d / 1e9 if d else 0
        row = [r.name, _f(d), _f(r.med("prefill")), _f(r.med("batch8")), _f(r.med("first_token_ms")),
               f"{r.rss_mb:.0f}", f"{gbs:.1f} ({100 * gbs / bw:.0f}%)"]
        row += [f"{d / ref.med('decode'):.2f}x" if (d and ref.med("decode")) else "-" for ref in refs]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    if refs:
        lines.append("")
        for r in res:
            if r.name.startswith("ours"):
                ratios = ", ".join(f"{r.med('prefill') / ref.med('prefill'):.2f}x {ref.name}" for ref in refs)
                lines.append(f"prefill-{report['prefill_len']} {r.name}: {ratios}")
    lines.append(f"\nmedians of {report['reps']} interleaved repetitions; {report['threads']} threads; "
                 f"bandwidth {bw:.1f} GB/s; process peak RSS {report['peak_rss_mb']:.0f} MB")
    for k, v in report["notes"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")
