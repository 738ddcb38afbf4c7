"""Randomized fuzz of structured output and of the server (bench/fuzz_structured.py) on the real SmolLM2-135M:
random JSON schemas, regexes, Lark and GBNF grammars and tool calls through the dynamic generator's filters and the
server's response_format / guided_* / tools on both endpoints (greedy and seeded, streamed or not): every finished
output parses and validates, a cut one says "length", refused schemas are 400s naming the field, a greedy/seeded
reply is the same streamed or not and among concurrent (and abandoned) requests, malformed requests are 4xx naming
the parameter and the server keeps serving. Plus regression tests for what the fuzz found."""

from __future__ import annotations

import json
import os
import sys

import httpx
import jsonschema
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import fuzz_structured as fz  # noqa: E402

from exllamav2.generator.grammar import ExLlamaV2JsonSchemaFilter, GrammarError  # noqa: E402
from exllamav2.server.structured import _rebase_refs, _required_schema  # noqa: E402


@pytest.fixture(scope="module")
def ctx(smollm2_gguf):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    c = fz.setup(max_seq_len=fz.MAX_SEQ_LEN)
    fz.check_baseline(c, -1, "setup")
    yield c
    fz.teardown(c)
    torch.set_num_threads(threads)


def _run(ctx, seed, kind):
    k, summary, fails = fz.run_round(ctx, seed, kind=kind)
    assert not fails, "\n".join(f.report() for f in fails)
    return summary


# fixed seeds, a few per kind: the CI subset (~20 s on two cores)
CI_ROUNDS = [(s, "schema") for s in (1, 3, 7, 11, 19, 23)] + [(2, "json_object")] + \
            [(s, "regex") for s in (9, 11)] + [(5, "lark"), (24, "lark"), (10, "ebnf")] + \
            [(s, "tools") for s in (5, 12, 31)] + [(s, "bad") for s in (0, 6)] + [(2, "concurrent"), (8, "concurrent")]


@pytest.mark.parametrize("seed,kind", CI_ROUNDS)
def test_fuzz_round(ctx, seed, kind):
    _run(ctx, seed, kind)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(4))
def test_fuzz_many_rounds(ctx, block):
    fails = []
    for r in range(40):
        _, _, f = fz.run_round(ctx, 1000 + 40 * block + r)
        fails += f
    assert not fails, "\n".join(f.report() for f in fails)


# ------------------------------------------------------------------------------------ regressions found by the fuzz

UNIT = {"enum": ["celsius", "fahrenheit"]}


@pytest.mark.parametrize("container", ["$defs", "definitions"])
def test_required_tool_choice_with_refs_in_the_parameters(ctx, container):
    """tool_choice "required" nests each tool's parameters in a list-of-calls schema; their own `#/$defs/...`
    (or `#/definitions/...`) references, and a recursive "#", must still resolve (they were a 400 'Pointer
    '/$defs/u' does not exist' while the same tool named in tool_choice worked)."""
    params = {"type": "object", container: {"u": UNIT},
              "properties": {"unit": {"$ref": f"#/{container}/u"},
                             "child": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}},
              "required": ["unit", "child"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": params}},
             {"type": "function", "function": {"name": "other", "parameters": {
                 "type": "object", "$defs": {"u": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "properties": {"n": {"$ref": "#/$defs/u"}}, "required": ["n"], "additionalProperties": False}}}]
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
                "tool_choice": "required", "max_tokens": 80, "temperature": 0, "stream": stream}
        status, reply, raw = fz.post(ctx, fz.CHAT, body)
        assert status == 200, raw
        c = reply["choices"][0]
        if c["finish_reason"] == "length":
            continue
        assert c["finish_reason"] == "tool_calls", c
        schemas = {"weather": params, "other": tools[1]["function"]["parameters"]}
        for call in c["message"]["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_rebase_refs_keeps_data_and_rewrites_references():
    schema = {"type": "object", "properties": {"$ref": {"$ref": "#/$defs/a"}, "const": {"const": {"$ref": "#"}}},
              "$defs": {"a": {"items": {"$ref": "#"}}}, "enum": [{"$ref": "#/x"}]}
    out = _rebase_refs(schema, "#/$defs/tool_0")
    assert out["properties"]["$ref"] == {"$ref": "#/$defs/tool_0/$defs/a"}  # a property named "$ref"
    assert out["properties"]["const"] == {"const": {"$ref": "#"}}  # data, untouched
    assert out["$defs"]["a"]["items"] == {"$ref": "#/$defs/tool_0"}
    assert out["enum"] == [{"$ref": "#/x"}]
    whole = _required_schema([{"name": "f", "parameters": schema}], parallel=False)
    assert whole["maxItems"] == 1 and whole["$defs"]["tool_0"] == out


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}])
def test_schema_without_any_instance_is_refused(ctx, schema):
    """{"$ref": "#"} has no finite instance; llguidance only says so once a mask is computed, and then allows just
    EOS: the reply was "" with finish_reason "stop". Now it is refused when compiled (a 400)."""
    with pytest.raises(GrammarError, match="no text satisfies it"):
        ExLlamaV2JsonSchemaFilter(ctx.model, ctx.tok, schema)
    for path in (fz.COMP, fz.CHAT):
        body = {"max_tokens": 10, "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": schema}}}
        body.update({"prompt": "JSON:"} if path == fz.COMP else {"messages": [{"role": "user", "content": "x"}]})
        status, reply, raw = fz.post(ctx, path, body)
        assert status == 400 and reply["error"]["param"] == "response_format.json_schema.schema", raw


def test_filter_reports_a_matcher_error_found_while_masking(ctx):
    """When the matcher errors while computing the mask (in the worker), llguidance allows only EOS; the filter
    must raise instead of letting EOS end the text as if it were complete."""
    import llguidance as llg

    from exllamav2.generator.grammar.compiler import JSON_OPTIONS, _TokenizerAdapter

    f = ExLlamaV2JsonSchemaFilter(ctx.model, ctx.tok, {"type": "object"})
    llt = _TokenizerAdapter.get(ctx.tok, f.vocab_size)
    f.matcher = llg.LLMatcher(llt, llg.LLMatcher.grammar_from_json_schema({"$ref": "#"}, defaults=JSON_OPTIONS),
                              log_level=0)  # what the compile-time probe now refuses
    f.begin("")
    with pytest.raises(ValueError, match="cannot go on"):
        f.next_bitmask()
    assert not any(f.ends_with(e) for e in f.eos_ids)


@pytest.mark.parametrize("path", [fz.COMP, fz.CHAT])
def test_unserializable_schema_number_is_a_400_naming_the_schema(ctx, path):
    """A bound too large for llguidance (10**30) raised a plain ValueError: the 400 blamed `messages` ("could not
    be tokenized") on chat and `response_format` on completions."""
    body = {"max_tokens": 5, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 0, "maximum": 10 ** 30}}}}
    body.update({"prompt": "x"} if path == fz.COMP else {"messages": [{"role": "user", "content": "x"}]})
    status, reply, raw = fz.post(ctx, path, body)
    assert status == 400, raw
    assert reply["error"]["param"] == "response_format.json_schema.schema", raw
    assert "tokenized" not in reply["error"]["message"]


@pytest.mark.parametrize("path,field", [(fz.COMP, "max_tokens"), (fz.CHAT, "max_tokens"),
                                        (fz.CHAT, "max_completion_tokens")])
def test_max_tokens_beyond_the_context_is_a_400(ctx, path, field):
    """max_tokens=10**9 was accepted and ran to the end of the context; now a budget larger than the whole context
    is a 400 naming the field (a budget only the prompt squeezes is still cut, with finish_reason "length")."""
    body = {field: 10 ** 9}
    body.update({"prompt": "x"} if path == fz.COMP else {"messages": [{"role": "user", "content": "x"}]})
    status, reply, raw = fz.post(ctx, path, body)
    assert status == 400 and reply["error"]["param"] == field and field in reply["error"]["message"], raw
    status, reply, raw = fz.post(ctx, path, {**body, field: 4, "temperature": 0, "stream": True})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), raw


def test_grammar_failing_mid_generation_does_not_hang(ctx):
    """A schema whose grammar fails after some tokens (llguidance: "Too many items"): the job that failed ends with
    an error reply (before the fix its request hung and its entry leaked), and the server keeps serving."""
    body = {"prompt": "JSON:", "max_tokens": 30, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": fz.RECURSIVE_REQUIRED}}}
    try:
        status, _, raw = fz.post(ctx, fz.COMP, body, timeout=8)
    except httpx.TimeoutException:
        pytest.fail("the request hung")
    assert status != 200 or json.loads(raw)["choices"][0]["finish_reason"] == "length", raw
    if status != 200:  # the request's own constraint failed: a 400 that says so, not a server error
        assert status == 400 and json.loads(raw)["error"]["code"] == "constraint_failed", raw
    fz.check_baseline(ctx, -1, "after")
    assert not ctx.failures


def test_logprob_bytes_rebuild_multibyte_characters(ctx):
    """Tokens holding part of a multi-byte character: their logprobs `bytes` were the UTF-8 of U+FFFD
    ([239, 191, 189]); they must be the token's own bytes, so joining them gives the reply's text."""
    body = {"messages": [{"role": "user", "content": "emoji"}], "max_tokens": 20, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"enum": ["😀😀", "日本語です"]}}}}
    status, reply, raw = fz.post(ctx, fz.CHAT, body)
    assert status == 200, raw
    c = reply["choices"][0]
    entries = c["logprobs"]["content"]
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8") == c["message"]["content"]
    assert all(e["bytes"] != [239, 191, 189] for e in entries)  # no token is a literal U+FFFD here
