"""Grammar-constrained decoding: decode time per token of one greedy dynamic-generator job with a typical JSON
schema (exllamav2/generator/grammar/) against the same job unconstrained, on SmolLM2-135M-Instruct in its default
weights. One process, one table; the target is an overhead of at most 10% per token.

    python bench/bench_grammar.py [-m MODEL] [--reps 3] [--threads N] [--no-backends]

Decode time runs from a job's first streamed token to its last, so prefill is not counted; the unconstrained job
generates exactly as many tokens as the constrained one did (no stop token). Also reported: the time the sampler
waits for and applies the mask per token (the mask itself is built in a worker thread during the forward), and,
unless --no-backends, the comparison of the two grammar libraries that chose llguidance (compile time of the
schema, mean/max mask time per token on the model's vocabulary; xgrammar only if installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["engineer", "manager", "designer", "scientist"]},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                     "city": {"type": "string", "maxLength": 30},
                                                     "country": {"type": "string", "maxLength": 30}},
                    "required": ["street", "city", "country"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "address", "skills", "active"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Invent an employee of a software company and describe them in JSON with "
                                        "name, age, email, role, address, skills and whether they are active."}]


def load(path: str | None):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.default_models import smollm2_gguf_path

    cfg = ExLlamaV2Config(path or smollm2_gguf_path())
    cfg.max_seq_len = 1024
    model = ExLlamaV2(cfg)
    model.load()
    return model, ExLlamaV2Tokenizer(cfg)


class _TimedFilter:
    """Wraps a grammar filter's mask_logits to time what the sampler spends on the mask per token."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def mask_logits(self, logits):
        t = time.perf_counter()
        out = self.inner.mask_logits(logits)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def run_job(gen, ids, max_new, filters, stops):
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob

    job = ExLlamaV2DynamicJob(ids, max_new, gen_settings=ExLlamaV2Sampler.Settings.greedy(), filters=filters,
                              stop_conditions=stops)
    gen.enqueue(job)
    text, tokens, reason = "", 0, None
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["stage"] == "streaming":
                text += r.get("text", "")
                tokens += r["token_ids"].numel() if "token_ids" in r else 0
                reason = r.get("eos_reason", reason)
    first, last = job.time_first_token, job.time_last_token
    return text, len(job.new_token_ids), (last - first) / max(1, len(job.new_token_ids) - 1), reason


EXAMPLE = {"name": "Maria Lopez", "age": 34, "email": "maria.lopez@example.com", "role": "engineer",
           "address": {"street": "12 Harbour Road", "city": "Lisbon", "country": "Portugal"},
           "skills": ["python", "rust", "distributed systems"], "active": True}


def critical_path(model, tok, reps: int = 3) -> tuple[float, float, int]:
    """(sampler ms/token without a filter, sampler + feed ms/token with one, tokens): the per-token work the
    grammar adds to the main thread, on the tokens of a valid reply, logits fixed. Between steps the thread sleeps
    2 ms, standing in for the forward the mask is built beside (not counted)."""
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.generator.grammar import ExLlamaV2JsonSchemaFilter

    ids = tok.encode(json.dumps(EXAMPLE))[0].tolist()
    logits = torch.randn(1, 1, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    greedy = ExLlamaV2Sampler.Settings.greedy()
    plain, constrained = [], []
    for _ in range(reps):
        f = ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA)
        f.begin("")
        for t in ids:
            time.sleep(0.002)
            a = time.perf_counter()
            ExLlamaV2Sampler.sample(logits, greedy, None, 0.5, tok)
            b = time.perf_counter()
            ExLlamaV2Sampler.sample(logits, greedy, None, 0.5, tok, filters=[f])
            f.feed(t)
            c = time.perf_counter()
            plain.append(b - a)
            constrained.append(c - b)
    return 1000 * statistics.median(plain), 1000 * statistics.median(constrained), len(ids)


def compare_backends(tokenizer, vocab: int, text: str) -> list[tuple]:
    """(library, compile ms, mean mask ms, max mask ms) over the tokens of `text`."""
    rows = []
    ids = tokenizer.encode(text)[0].tolist()
    import llguidance
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    from exllamav2.generator.grammar.compiler import JSON_OPTIONS

    llt = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_ids)
    t = time.perf_counter()
    m = llguidance.LLMatcher(llt, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS))
    compile_ms = 1000 * (time.perf_counter() - t)
    bm = allocate_token_bitmask(1, vocab)
    times = []
    for i in ids:
        t = time.perf_counter()
        fill_next_token_bitmask(m, bm)
        times.append(time.perf_counter() - t)
        if not m.consume_token(i):
            break
    rows.append(("llguidance", compile_ms, 1000 * statistics.mean(times), 1000 * max(times), len(times)))
    try:
        import transformers
        import xgrammar as xgr
    except ImportError:
        return rows
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=tokenizer.eos_token_ids)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    compile_ms = 1000 * (time.perf_counter() - t)
    xm = xgr.GrammarMatcher(cg)
    xb = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for i in ids:
        t = time.perf_counter()
        xm.fill_next_token_bitmask(xb)
        times.append(time.perf_counter() - t)
        if not xm.accept_token(i):
            break
    rows.append(("xgrammar", compile_ms, 1000 * statistics.mean(times), 1000 * max(times), len(times)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--reps", type=int, default=3, help="runs of each job; the median per-token time is reported")
    p.add_argument("--max-tokens", type=int, default=200, help="token budget of the constrained job")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-backends", action="store_true", help="skip the llguidance/xgrammar comparison")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
    from exllamav2.generator.grammar import ExLlamaV2JsonSchemaFilter, default_cache
    from exllamav2.generator.grammar.compiler import vocab_size_of

    model, tok = load(args.model)
    cache = ExLlamaV2Cache(model, 1, 1024)
    gen = ExLlamaV2DynamicGenerator(model, cache, tok, page_size=256)
    ids = tok.encode_chat(MESSAGES, add_generation_prompt=True)
    stops = list(tok.eos_token_ids)
    run_job(gen, ids, 8, None, stops)  # warm-up

    t = time.perf_counter()
    ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA)  # first compile (tokenizer adapter included)
    first_compile = time.perf_counter() - t
    constrained, plain, mask_ms = [], [], []
    text, n = "", 0
    for _ in range(args.reps):
        f = _TimedFilter(ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA))
        text, n, per_token, reason = run_job(gen, ids, args.max_tokens, [f], stops)
        constrained.append(per_token)
        mask_ms.append(1000 * f.seconds / max(1, f.calls))
        _, n_plain, per_token, _ = run_job(gen, ids, n, None, [])
        assert n_plain == n
        plain.append(per_token)
    valid = True
    try:
        json.loads(text)
    except json.JSONDecodeError:
        valid = False
    c, u = statistics.median(constrained), statistics.median(plain)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (GGUF, default weights)'}; torch threads "
          f"{torch.get_num_threads()}; {args.reps} runs each, median")
    print(f"constrained reply: {n} tokens, ended by {reason}, parses as JSON: {valid}")
    print(f"first compile of the schema (with the tokenizer adapter): {1000 * first_compile:.1f} ms; "
          f"grammars compiled: {default_cache.compiled}")
    print()
    print(f"| {'job':<28} | {'ms/token':>9} | {'tokens/s':>9} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|")
    print(f"| {'unconstrained':<28} | {1000 * u:9.2f} | {1 / u:9.1f} |")
    print(f"| {'JSON schema (llguidance)':<28} | {1000 * c:9.2f} | {1 / c:9.1f} |")
    print()
    print(f"overhead per token: {100 * (c / u - 1):+.1f}% (target <= +10%); sampler time on the mask "
          f"(wait + unpack + apply): {statistics.median(mask_ms):.3f} ms/token")
    base_ms, grammar_ms, k = critical_path(model, tok)
    print(f"main-thread work per token, median over {k} tokens of a valid reply: sampler alone {base_ms:.3f} ms, "
          f"sampler + mask + feed {grammar_ms:.3f} ms (+{grammar_ms - base_ms:.3f} ms = "
          f"{100 * (grammar_ms - base_ms) / (1000 * u):.1f}% of the unconstrained decode step)")
    if not args.no_backends:
        print()
        print(f"| {'library':<11} | {'compile ms':>10} | {'mask ms mean':>12} | {'mask ms max':>11} | {'tokens':>6} |")
        print(f"|{'-' * 13}|{'-' * 12}|{'-' * 14}|{'-' * 13}|{'-' * 8}|")
        for name, comp, mean, mx, k in compare_backends(tok, vocab_size_of(model, tok), text):
            print(f"| {name:<11} | {comp:10.2f} | {mean:12.4f} | {mx:11.3f} | {k:6d} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
