"""Grammar filters (exllamav2/generator/grammar/) on the tiny random Llama with SmolLM2's tokenizer: every
generator honours them, the constrained text parses and validates, a job ends when the grammar is complete, greedy
decoding under a grammar picks the model's best allowed token, bad grammars are refused, compiled grammars are
cached."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator import ExLlamaV2Sampler
from exllamav2.generator.base import ExLlamaV2BaseGenerator
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.generator.grammar import (ExLlamaV2EbnfFilter, ExLlamaV2GrammarFilter, ExLlamaV2JsonObjectFilter,
                                         ExLlamaV2JsonSchemaFilter, ExLlamaV2LarkFilter, ExLlamaV2RegexFilter,
                                         GrammarCache, GrammarError)
from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator
from test_dynamic_tiny import PAGE, tiny  # noqa: F401  (fixture)

# bounded, so a random model finishes it within a few dozen tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}},
                  "required": ["name"], "additionalProperties": False},
        "ok": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    },
    "required": ["kind", "age", "tags", "owner", "ok"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [0-9]{1,3}!"
LARK = 'start: "move " DIR " " NUM\nDIR: "north" | "south" | "east" | "west"\nNUM: /[1-9]/'
EBNF = 'root ::= "color: " ("red" | "green" | "blue") ";"'


def settings(seed_temperature: float = 0.0):
    s = ExLlamaV2Sampler.Settings.greedy() if seed_temperature == 0 else ExLlamaV2Sampler.Settings(
        temperature=seed_temperature, top_k=0, top_p=1.0)
    return s


def run_dynamic(model, tok, prompt, filters, max_new=80, temperature=0.0, seed=1):
    cache = ExLlamaV2Cache(model, 1, 8 * PAGE)
    gen = ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE)
    job = ExLlamaV2DynamicJob(tok.encode(prompt), max_new, gen_settings=settings(temperature), seed=seed,
                              stop_conditions=list(tok.eos_token_ids), filters=filters)
    gen.enqueue(job)
    text, reason = "", None
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["stage"] == "streaming":
                text += r.get("text", "")
                if r["eos"]:
                    reason = r["eos_reason"]
    return text, reason


def run_streaming(model, tok, prompt, filters, max_new=80):
    cache = ExLlamaV2Cache(model, 1, 8 * PAGE)
    gen = ExLlamaV2StreamingGenerator(model, cache, tok)
    gen.begin_stream_ex(tok.encode(prompt), settings(), filters=filters, max_new_tokens=max_new)
    text = ""
    while True:
        r = gen.stream_ex()
        text += r["chunk"]
        if r["eos"]:
            return text, r["eos_reason"]


def run_base(model, tok, prompt, filters, max_new=80):
    cache = ExLlamaV2Cache(model, 1, 8 * PAGE)
    gen = ExLlamaV2BaseGenerator(model, cache, tok)
    return gen.generate_simple(prompt, settings(), max_new, filters=filters, completion_only=True), None


RUNNERS = {"base": run_base, "streaming": run_streaming, "dynamic": run_dynamic}


@pytest.mark.parametrize("which", sorted(RUNNERS))
def test_every_generator_honours_a_json_schema(tiny, which):
    _, model, tok = tiny
    text, reason = RUNNERS[which](model, tok, "Describe a pet as JSON:", [ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA)])
    jsonschema.validate(json.loads(text), SCHEMA)
    if reason is not None:
        assert reason == "end_filter"  # the grammar ended the job, not the token budget


@pytest.mark.parametrize("which", sorted(RUNNERS))
def test_every_generator_honours_regex_lark_and_ebnf(tiny, which):
    _, model, tok = tiny
    run = RUNNERS[which]
    text, _ = run(model, tok, "Answer:", [ExLlamaV2RegexFilter(model, tok, REGEX)])
    assert re.fullmatch(REGEX, text), text
    text, _ = run(model, tok, "Go:", [ExLlamaV2LarkFilter(model, tok, LARK)])
    assert re.fullmatch(r"move (north|south|east|west) [1-9]", text), text
    text, _ = run(model, tok, "Pick:", [ExLlamaV2EbnfFilter(model, tok, EBNF)])
    assert re.fullmatch(r"color: (red|green|blue);", text), text


def check_sampled(model, tok, seeds, max_new, schema_too: bool):
    for seed in seeds:
        text, reason = run_dynamic(model, tok, "{", [ExLlamaV2JsonObjectFilter(model, tok)], max_new=max_new,
                                   temperature=1.0, seed=seed)
        if reason == "max_new_tokens":
            assert text.startswith("{")
            continue
        assert isinstance(json.loads(text), dict), text
    if schema_too:
        text, _ = run_dynamic(model, tok, "x", [ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA)], temperature=1.0,
                              seed=7)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_sampled(tiny):
    """Sampling (temperature 1) under the JSON-object grammar: whatever the draw, the text is one JSON object or
    the budget ran out inside it."""
    _, model, tok = tiny
    check_sampled(model, tok, [0], 12, schema_too=False)


@pytest.mark.slow
def test_json_sampled_many_seeds(tiny):
    _, model, tok = tiny
    check_sampled(model, tok, range(6), 40, schema_too=True)


def test_greedy_under_a_grammar_is_the_best_allowed_token(tiny):
    """Reference: the model's logits at each step, restricted to the ids a separate matcher allows (computed
    synchronously, no worker thread), argmax. The dynamic generator must pick exactly those tokens."""
    _, model, tok = tiny
    prompt = tok.encode("Pet:")
    filt = ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA)
    ref_filter = ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA)
    matcher = ref_filter.matcher
    cache = ExLlamaV2Cache(model, 1, 256)
    logits = model.forward(prompt, cache, last_id_only=True)
    ref = []
    eos = set(tok.eos_token_ids)
    for _ in range(60):
        mask = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().flatten()
        allowed = allowed[:logits.shape[-1]]
        t = int(logits[0, -1].float().masked_fill(~allowed, float("-inf")).argmax())
        ref.append(t)
        if t in eos:
            break
        assert matcher.consume_token(t)
        if matcher.is_stopped():
            break
        logits = model.forward(torch.tensor([[t]]), cache)
    got = []
    cache2 = ExLlamaV2Cache(model, 1, 8 * PAGE)
    gen = ExLlamaV2DynamicGenerator(model, cache2, tok, page_size=PAGE)
    gen.enqueue(ExLlamaV2DynamicJob(prompt, 60, gen_settings=settings(), filters=[filt],
                                    stop_conditions=list(eos)))
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            got += r.get("token_ids", torch.empty(1, 0)).flatten().tolist() if r["stage"] == "streaming" else []
    assert got == [t for t in ref if t not in eos] or got == ref
    assert matcher.is_stopped() and filt.is_finished()


def test_sampler_masks_and_ends(tiny):
    """The sampler applies the mask (a forbidden id is never picked, however likely) and reports the end of the
    grammar at the token that completes it."""
    _, model, tok = tiny
    f = ExLlamaV2RegexFilter(model, tok, "(cat|dog)!")
    f.begin("")
    allowed, end = f.next()
    assert allowed and not end
    assert all("cat!".startswith(tok.decode_list([t])) or "dog!".startswith(tok.decode_list([t])) for t in allowed)
    dog, bang, z = tok.single_id("dog"), tok.single_id("!"), tok.single_id("z")
    assert dog in allowed and z not in allowed
    logits = torch.zeros(1, 1, model.config.vocab_size)
    logits[0, 0, dog] = 5.0
    logits[0, 0, z] = 50.0
    token, *_, end_filter = ExLlamaV2Sampler.sample(logits, settings(), None, 0.5, tok, filters=[f])
    assert int(token) == dog and not end_filter
    f.feed(dog)
    logits[0, 0, bang] = 1.0
    token, *_, end_filter = ExLlamaV2Sampler.sample(logits, settings(), None, 0.5, tok, filters=[f])
    assert int(token) == bang and end_filter
    f.feed(bang)
    assert f.is_finished() and f.next() == ({*tok.eos_token_ids}, {*tok.eos_token_ids})


def test_bad_grammars_are_refused_with_the_reason(tiny):
    _, model, tok = tiny
    with pytest.raises(GrammarError, match="foo"):
        ExLlamaV2JsonSchemaFilter(model, tok, {"type": "foo"})
    with pytest.raises(GrammarError, match="(?i)format"):
        ExLlamaV2JsonSchemaFilter(model, tok, {"type": "string", "format": "no-such-format"})
    with pytest.raises(GrammarError, match="(?i)minimum"):
        ExLlamaV2JsonSchemaFilter(model, tok, {"type": "integer", "minimum": 5, "maximum": 2})
    with pytest.raises(GrammarError, match="not valid JSON"):
        ExLlamaV2JsonSchemaFilter(model, tok, "{not json")
    with pytest.raises(GrammarError, match="(?i)look"):
        ExLlamaV2RegexFilter(model, tok, "(?<=a)b")
    with pytest.raises(GrammarError):
        ExLlamaV2LarkFilter(model, tok, "start: undefined_rule")
    with pytest.raises(GrammarError, match="EBNF"):
        ExLlamaV2EbnfFilter(model, tok, "root ::= (")
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        ExLlamaV2GrammarFilter(model, tok, "yaml", "a: b")


def test_each_grammar_compiles_once_and_the_cache_is_bounded(tiny):
    _, model, tok = tiny
    cache = GrammarCache(capacity=2)
    a = ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA, cache=cache)
    b = ExLlamaV2JsonSchemaFilter(model, tok, json.dumps(SCHEMA), cache=cache)
    assert cache.compiled == 1 and len(cache) == 1
    assert a.matcher is not b.matcher  # each filter has its own state
    a.begin("")
    a.feed(tok.single_id("{"))
    b.begin("")
    assert a.next()[0] != b.next()[0]
    ExLlamaV2RegexFilter(model, tok, "a+", cache=cache)
    ExLlamaV2RegexFilter(model, tok, "b+", cache=cache)
    assert len(cache) == 2 and cache.compiled == 3
    ExLlamaV2JsonSchemaFilter(model, tok, SCHEMA, cache=cache)  # evicted: compiled again
    assert cache.compiled == 4


def test_mask_is_computed_in_the_worker_beside_the_caller(tiny):
    """feed() returns before the next mask exists: it is computed in the grammar worker thread."""
    import threading

    _, model, tok = tiny
    f = ExLlamaV2JsonObjectFilter(model, tok)
    seen = []
    real = f.matcher

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def unsafe_compute_mask_ptr(self, *args):
            seen.append(threading.current_thread().name)
            return real.unsafe_compute_mask_ptr(*args)

    f.matcher = Spy()
    f.begin("")
    f.feed(tok.single_id("{"))
    allowed, _ = f.next()
    assert allowed and seen and all(name.startswith("exllamav2-grammar") for name in seen)


@pytest.mark.slow
def test_bench_grammar_runs():
    """bench/bench_grammar.py end to end on SmolLM2 (a short run: it guards the script, not the figures)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_grammar.py"), "--reps", "1",
                        "--max-tokens", "24", "--no-backends"], capture_output=True, text=True, timeout=1800, cwd=root,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("| unconstrained", "| JSON schema (llguidance)", "overhead per token", "main-thread work per token"):
        assert row in r.stdout, r.stdout
