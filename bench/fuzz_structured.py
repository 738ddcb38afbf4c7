"""Randomized fuzz of structured output (JSON schema, regex, Lark, GBNF, tool calls) and of the OpenAI-compatible
server's robustness, on the real SmolLM2-135M-Instruct.

Each round draws one case from its seed:
- schema:   a random JSON schema (nested objects, required/optional, arrays with min/maxItems, enums, const,
            patterns, formats, string lengths, integer/number ranges and multipleOf, booleans, nulls, anyOf/oneOf,
            $ref/$defs, additionalProperties, unicode property names, {}) through the dynamic generator's
            JSON-schema filter (greedy and seeded) and through the server's response_format on both endpoints
            (greedy/seeded, streamed or not, n up to 3). A finished output must parse and validate (jsonschema,
            with its format checker); one cut by max_tokens must say finish_reason "length". A schema llguidance
            refuses must be a 400 naming response_format.json_schema.schema. Greedy/seeded requests are repeated
            in the other streaming mode and must give the same text.
- regex / lark / ebnf: random grammars (guided_regex, guided_grammar, guided_choice, and the generator filters);
            the finished text must be in the language.
- tools:    random tools with tool_choice required / named / auto (parallel or not); forced calls must name a
            given tool and their arguments must validate against its parameters.
- bad:      random malformed bodies and parameter values (wrong types, out of range, unknown fields, non-UTF-8,
            lone surrogates, prompts beyond the context, bad schemas): a 4xx (never 500) whose message names the
            parameter; afterwards a known request still gives its known reply.
- concurrent: up to 8 requests at once (greedy/seeded, some streaming, some with a schema, some abandoned
            mid-stream by closing the connection): each must give its reply from alone; the generator must drain.

    python bench/fuzz_structured.py --seed 0 --rounds 30
    python bench/fuzz_structured.py --seed 5 --rounds 10 --kinds schema,tools

One line per round; a mismatch report (round seed, request, what is wrong) per failure; exit code 1 on any.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import httpx
import jsonschema
import torch

KINDS = ("schema", "regex", "lark", "ebnf", "tools", "bad", "concurrent")
MAX_SEQ_LEN = 2048  # room for a few tools described in the system message
PROMPTS = ["Reply in JSON.", "Describe a person as JSON:", "Give me some data about a city.", "Answer:",
           "List three things.", "What is the weather in Paris?", "Write a short record for a book.",
           "Hello! Tell me about cats."]
WORDS = ["red", "green", "blue", "cat", "dog", "alpha", "beta", "x", "yes", "no", "Paris", "été", "日本", "😀",
         "a b", 'q"uote', "back\\slash", "new\nline"]
KEYS = ["name", "age", "id", "tags", "city", "ok", "value", "items", "kind", "score", "名前", "ÿ€😀", "émoji 😀",
        "a b", "x-y", "$weird", "k\"q", "nested", "list", "n"]
# formats llguidance enforces (others are refused, which the schema rounds also check)
FORMATS = ["date-time", "date", "time", "email", "uuid", "ipv4", "ipv6", "hostname", "duration"]
PATTERNS = [r"^[a-z]{2,6}$", r"^[0-9]{3}-[0-9]{4}$", r"^(foo|bar|baz)$", r"^[A-Z][a-z]*$", r"^x+y?$",
            r"^[α-ω]{1,4}$", r"^\d{1,3}(\.\d{1,2})?$", r"^[a-f0-9]{8}$"]


# --------------------------------------------------------------------------------------------------- schemas


class SchemaGen:
    """Random JSON schemas that are satisfiable and small enough for a 135M model to finish within ~100 tokens
    (string lengths, array sizes and nesting are bounded)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.defs: dict = {}

    def schema(self) -> dict:
        r = self.rng
        self.defs = {}
        roll = r.random()
        if roll < 0.05:
            return {}
        if roll < 0.15:
            s = self.value(2)
        else:
            s = self.obj(0)
        if self.defs:
            s = {**s, r.choice(["$defs", "definitions"]): self.defs} if "$ref" not in s else \
                {"allOf": [s], "$defs": self.defs}
            # keep the referenced keyword consistent with the container
            key = "$defs" if "$defs" in s else "definitions"
            s = json.loads(json.dumps(s).replace("#/$defs/", f"#/{key}/"))
        return s

    def obj(self, depth: int) -> dict:
        r = self.rng
        n = r.randint(0, 4 if depth == 0 else 3)
        keys = r.sample(KEYS, n)
        props = {k: self.value(depth + 1) for k in keys}
        s: dict = {"type": "object", "properties": props}
        req = [k for k in keys if r.random() < 0.7]
        if req or r.random() < 0.3:
            s["required"] = req
        ap = r.random()
        if ap < 0.6:
            s["additionalProperties"] = False
        elif ap < 0.7:
            s["additionalProperties"] = True
        elif ap < 0.8:
            s["additionalProperties"] = {"type": "integer", "minimum": 0, "maximum": 9}
            s["maxProperties"] = len(keys) + 1
        if r.random() < 0.15 and depth == 0:
            s = {k: v for k, v in s.items() if k != "type"}  # untyped object schema
        return s

    def value(self, depth: int) -> dict:
        r = self.rng
        choices = ["string", "integer", "number", "boolean", "null", "enum", "const", "anyof", "oneof", "nullable",
                   "array", "ref", "object", "empty_small"]
        weights = [6, 5, 3, 2, 1, 3, 1, 2, 1, 2, 3, 1, 3 if depth < 3 else 0, 1]
        kind = r.choices(choices, weights)[0]
        if kind == "string":
            s: dict = {"type": "string"}
            roll = r.random()
            if roll < 0.25:
                s["pattern"] = r.choice(PATTERNS)
            elif roll < 0.4:
                s["format"] = r.choice(FORMATS)
            else:
                lo = r.choice([0, 0, 1, 2, 3])
                s["maxLength"] = r.randint(max(lo, 1), 12)
                if lo:
                    s["minLength"] = lo
            return s
        if kind in ("integer", "number"):
            s = {"type": kind}
            if r.random() < 0.7:
                lo = r.randint(-50, 50)
                hi = lo + r.randint(0, 200)
                if r.random() < 0.2:
                    s["exclusiveMinimum"], s["exclusiveMaximum"] = lo, hi + 2
                else:
                    s["minimum"], s["maximum"] = lo, hi
            else:
                s["minimum"], s["maximum"] = -1000, 100000  # unbounded digits would run past max_tokens
            if kind == "integer" and r.random() < 0.2:
                s["multipleOf"] = r.choice([2, 3, 5, 10])
                s["minimum"], s["maximum"] = 0, 1000
                s.pop("exclusiveMinimum", None)
                s.pop("exclusiveMaximum", None)
            return s
        if kind == "boolean":
            return {"type": "boolean"}
        if kind == "null":
            return {"type": "null"}
        if kind == "enum":
            pool = WORDS + [1, 2.5, -3, True, False, None]
            return {"enum": r.sample(pool, r.randint(1, 4))}
        if kind == "const":
            return {"const": r.choice(WORDS + [0, 42, True, None])}
        if kind == "anyof":
            return {"anyOf": [self.value(depth + 1) for _ in range(r.randint(2, 3))]}
        if kind == "oneof":
            # branches of different types, so exactly one matches
            return {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                              {"type": "string", "maxLength": 6}, {"type": "boolean"}][:r.randint(2, 3)]}
        if kind == "nullable":
            inner = self.value(depth + 1)
            if "type" in inner and isinstance(inner["type"], str) and inner["type"] != "null" \
                    and set(inner) <= {"type", "minimum", "maximum", "maxLength", "minLength"}:
                return {**inner, "type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
        if kind == "array":
            lo = r.randint(0, 2)
            s = {"type": "array", "items": self.value(depth + 2) if depth < 3 else {"type": "integer",
                                                                                  "minimum": 0, "maximum": 9}}
            s["maxItems"] = r.randint(max(lo, 1), 3)
            if lo:
                s["minItems"] = lo
            return s
        if kind == "ref":
            name = r.choice(["color", "point", "small"])
            if name not in self.defs:
                self.defs[name] = {"color": {"enum": ["red", "green", "blue"]},
                                   "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                                    "maximum": 9},
                                                                              "y": {"type": "integer", "minimum": 0,
                                                                                    "maximum": 9}},
                                             "required": ["x", "y"], "additionalProperties": False},
                                   "small": {"type": "string", "maxLength": 5}}[name]
            return {"$ref": f"#/$defs/{name}"}
        if kind == "object":
            return self.obj(depth + 1)
        return r.choice([{}, {"enum": ["ok"]}, {"type": "string", "maxLength": 5}])  # {} anywhere: any JSON


def bad_schema(rng: random.Random) -> dict:
    """Schemas llguidance refuses (or that are unsatisfiable)."""
    return rng.choice([
        {"type": "string", "format": "no-such-format"},
        {"type": "integer", "minimum": 5, "maximum": 2},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "(?=look)ahead"},
        {"type": "string", "pattern": "(a)\\1"},
        {"type": "array", "uniqueItems": True, "items": {"type": "integer"}},
        {"not": {"type": "string"}},
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"],
         "additionalProperties": False},
        {"type": "string", "enum": [1, 2]},
        {"type": "strng"},
        {"type": "string", "minLength": 5, "maxLength": 2},
        {"type": "array", "minItems": 3, "maxItems": 1},
        {"type": "string", "pattern": "[unclosed"},
        {"$ref": "#"},  # no finite instance: once finished as "" with finish_reason "stop"
        {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"type": "integer", "minimum": 0, "maximum": 10 ** 30},  # once a 400 blaming `messages`/"tokenized"
    ])


_FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER  # not FormatChecker(): its "time" is draft 3's


def validate(value, schema) -> str | None:
    """None when `value` is valid against `schema`, else why not."""
    try:
        jsonschema.Draft202012Validator(schema, format_checker=_FORMAT_CHECKER).validate(value)
    except jsonschema.ValidationError as e:
        return f"{e.message} (at {list(e.absolute_path)})"
    return None


def check_json(text: str, schema) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON ({e}): {text!r}"
    why = validate(value, schema)
    return None if why is None else f"invalid against the schema: {why}: {text!r}"


# --------------------------------------------------------------------------------------------------- grammars


def random_regex(rng: random.Random) -> tuple[str, str]:
    """(Rust-regex text for llguidance, the Python `re` equivalent)."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["lit", "alt", "cls", "rep", "opt", "uni"])
        if kind == "lit":
            parts.append(re.escape(rng.choice(["id:", " ", "-", "Total", ".", "(", "x"])))
        elif kind == "alt":
            parts.append("(" + "|".join(re.escape(w) for w in rng.sample(["yes", "no", "maybe", "red", "été"],
                                                                          rng.randint(2, 3))) + ")")
        elif kind == "cls":
            parts.append(rng.choice(["[0-9]", "[a-z]", "[A-F0-9]", "[aeiou]"]) + "{%d,%d}" % (1, rng.randint(1, 4)))
        elif kind == "rep":
            parts.append(rng.choice(["[0-9]", "[a-z]"]) + "{%d}" % rng.randint(1, 3))
        elif kind == "opt":
            parts.append("(" + re.escape(rng.choice(["!", "?", " ok"])) + ")?")
        else:
            parts.append(rng.choice(["[α-ω]{1,2}", "(日本|中国)"]))
    text = "".join(parts)
    return text, text


def random_lark(rng: random.Random) -> tuple[str, str]:
    """(Lark grammar, Python regex of its language)."""
    verbs = rng.sample(["go", "move", "run", "jump"], rng.randint(1, 3))
    dirs = rng.sample(["north", "south", "east", "west", "up"], rng.randint(2, 4))
    n = rng.randint(1, 3)
    grammar = (f'start: VERB " " DIR (" " NUM)?\nVERB: {" | ".join(json.dumps(v) for v in verbs)}\n'
               f'DIR: {" | ".join(json.dumps(d) for d in dirs)}\nNUM: /[1-9][0-9]{{0,{n - 1}}}/')
    py = f"({'|'.join(verbs)}) ({'|'.join(dirs)})( [1-9][0-9]{{0,{n - 1}}})?"
    if rng.random() < 0.4:  # an embedded JSON schema
        grammar = (f'start: "result=" obj\nobj: %json{{"type": "object", "properties": {{"v": {{"enum": '
                   f'{json.dumps(dirs)}}}}}, "required": ["v"], "additionalProperties": false}}')
        # %json inside Lark keeps llguidance's default flexible whitespace
        py = "result=" + r"\{\s*\"v\"\s*:\s*\"(" + "|".join(dirs) + r")\"\s*\}"
    return grammar, py


def random_ebnf(rng: random.Random) -> tuple[str, str]:
    colors = rng.sample(["red", "green", "blue", "black", "white"], rng.randint(2, 4))
    sep = rng.choice([", ", ";", " and "])
    k = rng.randint(1, 3)
    more = f'({json.dumps(sep)} color){{0,{k - 1}}} ' if k > 1 else ""
    grammar = (f'root ::= "colors: " color {more}"."\n'
               f'color ::= {" | ".join(json.dumps(c) for c in colors)}')
    alt = "(" + "|".join(colors) + ")"
    py = f"colors: {alt}({re.escape(sep)}{alt}){{0,{k - 1}}}\\."
    return grammar, py


# --------------------------------------------------------------------------------------------------- harness


@dataclass
class Failure:
    seed: int
    kind: str
    what: str
    request: object = None

    def report(self) -> str:
        req = json.dumps(self.request, ensure_ascii=False)[:1500] if self.request is not None else ""
        return f"MISMATCH round seed={self.seed} kind={self.kind}: {self.what}\n    request: {req}"


@dataclass
class Ctx:
    model: object
    tok: object
    engine: object
    srv: object
    url: str
    http: httpx.Client
    direct: object = None  # a synchronous dynamic generator on its own cache, for filter-level checks
    failures: list = field(default_factory=list)
    baseline: dict | None = None  # the known reply of a fixed request, rechecked after bad requests


def setup(model=None, tok=None, max_seq_len: int = MAX_SEQ_LEN) -> Ctx:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
    from exllamav2.generator.dynamic_async import ExLlamaV2DynamicGeneratorAsync
    from exllamav2.server import ServerEngine, start_in_thread

    if model is None:
        from exllamav2.default_models import smollm2_gguf_path
        cfg = ExLlamaV2Config(smollm2_gguf_path())
        cfg.max_seq_len = max_seq_len
        model = ExLlamaV2(cfg)
        model.load()
        tok = ExLlamaV2Tokenizer(cfg)
    cache = ExLlamaV2Cache(model, 1, 8 * 256)
    agen = ExLlamaV2DynamicGeneratorAsync(model, cache, tok, max_batch_size=8, page_size=256)
    engine = ServerEngine(model, tok, agen, "smollm2", max_queue=64)
    srv = start_in_thread(engine)
    dcache = ExLlamaV2Cache(model, 1, 4 * 256)
    direct = ExLlamaV2DynamicGenerator(model, dcache, tok, max_batch_size=4, page_size=256)
    http = httpx.Client(base_url=srv.url, timeout=httpx.Timeout(120.0))
    return Ctx(model, tok, engine, srv, srv.url, http, direct)


def teardown(ctx: Ctx) -> None:
    ctx.http.close()
    ctx.srv.stop()
    ctx.engine.close()


def post(ctx: Ctx, path: str, body, timeout: float = 120.0) -> tuple[int, dict | None, str]:
    """(status, JSON body or None, raw text); streamed bodies are folded into a non-streamed-like reply."""
    headers = {"content-type": "application/json"}
    if isinstance(body, (bytes, str)):
        r = ctx.http.post(path, content=body, headers=headers, timeout=timeout)
        return r.status_code, _json_or_none(r.text), r.text
    raw = json.dumps(body).encode()  # ASCII escapes: lone surrogates travel as \udXXX, as a client would send them
    if not body.get("stream"):
        r = ctx.http.post(path, content=raw, headers=headers, timeout=timeout)
        return r.status_code, _json_or_none(r.text), r.text
    with ctx.http.stream("POST", path, content=raw, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            text = r.read().decode("utf-8", "replace")
            return r.status_code, _json_or_none(text), text
        return 200, fold_stream(r.iter_lines(), chat=path.endswith("chat/completions")), ""


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def fold_stream(lines, chat: bool) -> dict:
    """SSE lines -> {"choices": [{"index", "text"/"message", "finish_reason"}], "usage", "done", "error"}."""
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    calls: dict[int, list] = {}
    out: dict = {"done": False, "error": None, "usage": None}
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            out["done"] = True
            continue
        obj = json.loads(data)
        if "error" in obj:
            out["error"] = obj["error"]
            continue
        if obj.get("usage"):
            out["usage"] = obj["usage"]
        for c in obj.get("choices", []):
            i = c["index"]
            texts.setdefault(i, "")
            if chat:
                d = c.get("delta") or {}
                texts[i] += d.get("content") or ""
                for tc in d.get("tool_calls") or []:
                    calls.setdefault(i, []).append(tc)
            else:
                texts[i] += c.get("text") or ""
            if c.get("finish_reason"):
                if finish.get(i):
                    out["error"] = f"choice {i} got two finish_reasons"
                finish[i] = c["finish_reason"]
    choices = []
    for i in sorted(texts):
        if chat:
            msg = {"role": "assistant", "content": texts[i]}
            if i in calls:
                msg = {"role": "assistant", "content": texts[i] or None, "tool_calls": calls[i]}
            choices.append({"index": i, "message": msg, "finish_reason": finish.get(i)})
        else:
            choices.append({"index": i, "text": texts[i], "finish_reason": finish.get(i)})
    out["choices"] = choices
    return out


def choice_text(c: dict) -> str:
    return c["message"]["content"] if "message" in c else c["text"]


def rng_sampling(rng: random.Random, body: dict) -> dict:
    """Greedy or seeded sampling at one of several temperatures."""
    t = rng.choice([0.0, 0.0, 0.3, 0.7, 1.0, 1.3])
    body["temperature"] = t
    if t > 0:
        body["seed"] = rng.randint(0, 2 ** 31)
        if rng.random() < 0.3:
            body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    return body


def deterministic(body: dict) -> bool:
    return body.get("temperature", 1.0) == 0 or body.get("seed") is not None


# --------------------------------------------------------------------------------------------------- round kinds


class RoundFail(Exception):
    pass


def fail(ctx: Ctx, seed: int, kind: str, what: str, request=None):
    ctx.failures.append(Failure(seed, kind, what, request))


def check_finished_choices(ctx, seed, kind, path, body, reply, checker) -> list[str]:
    """Every choice: finish_reason set; "stop" -> checker(text) is None; "length" -> fine (cut). Returns texts."""
    texts = []
    n = body.get("n", 1)
    if reply is None or "choices" not in reply:
        fail(ctx, seed, kind, f"{path}: no choices in the reply: {str(reply)[:300]}", body)
        return texts
    if body.get("stream") and (not reply.get("done") or reply.get("error")):
        fail(ctx, seed, kind, f"{path}: stream ended without [DONE] or with an error: {reply.get('error')}", body)
    if len(reply["choices"]) != n:
        fail(ctx, seed, kind, f"{path}: {len(reply['choices'])} choices for n={n}", body)
    for c in reply["choices"]:
        text = choice_text(c) or ""
        texts.append(text)
        fr = c.get("finish_reason")
        if fr not in ("stop", "length"):
            fail(ctx, seed, kind, f"{path}: finish_reason {fr!r} (choice {c['index']})", body)
        elif fr == "stop":
            why = checker(text)
            if why:
                fail(ctx, seed, kind, f"{path}: finished output ({'stream' if body.get('stream') else 'plain'}) "
                                      f"{why}", body)
    return texts


def server_structured(ctx: Ctx, seed: int, kind: str, rng: random.Random, extra: dict, checker,
                      max_tokens: int) -> None:
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    prompt = rng.choice(PROMPTS)
    body: dict = {"max_tokens": max_tokens, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    rng_sampling(rng, body)
    body["n"] = rng.choice([1, 1, 1, 2, 3])
    body["stream"] = rng.random() < 0.5
    status, reply, raw = post(ctx, path, body)
    if status != 200:
        fail(ctx, seed, kind, f"{path}: HTTP {status}: {raw[:400]}", body)
        return
    texts = check_finished_choices(ctx, seed, kind, path, body, reply, checker)
    if deterministic(body) and texts:
        again = {**body, "stream": not body["stream"]}
        status2, reply2, raw2 = post(ctx, path, again)
        if status2 != 200:
            fail(ctx, seed, kind, f"{path}: repeat HTTP {status2}: {raw2[:300]}", again)
            return
        texts2 = [choice_text(c) or "" for c in reply2.get("choices", [])]
        fr1 = [c.get("finish_reason") for c in reply["choices"]]
        fr2 = [c.get("finish_reason") for c in reply2.get("choices", [])]
        if texts2 != texts or fr1 != fr2:
            fail(ctx, seed, kind, f"{path}: the same greedy/seeded request gave different replies streamed="
                                  f"{body['stream']}: {texts!r} {fr1} vs streamed={again['stream']}: {texts2!r} "
                                  f"{fr2}", body)


def direct_filter(ctx: Ctx, seed: int, kind: str, rng: random.Random, make_filter, checker, max_new: int) -> None:
    """The grammar filter on the synchronous dynamic generator, two jobs at once (greedy and seeded)."""
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob

    tok, gen = ctx.tok, ctx.direct
    jobs = []
    for j in range(2):
        prompt = rng.choice(PROMPTS)
        temp = 0.0 if j == 0 else rng.choice([0.5, 1.0, 1.5])
        s = ExLlamaV2Sampler.Settings.greedy() if temp == 0 else ExLlamaV2Sampler.Settings(
            temperature=temp, top_k=0, top_p=1.0, token_repetition_penalty=1.0)
        job = ExLlamaV2DynamicJob(tok.encode(prompt), max_new, gen_settings=s, seed=rng.randint(0, 10 ** 6),
                                  stop_conditions=list(tok.eos_token_ids), filters=[make_filter()], identifier=j)
        gen.enqueue(job)
        jobs.append((j, prompt, temp))
    texts = {j: "" for j, _, _ in jobs}
    reasons: dict = {}
    t0 = time.time()
    while gen.num_remaining_jobs():
        if time.time() - t0 > 300:
            fail(ctx, seed, kind, "direct generator: jobs still running after 300 s")
            for j in list(gen.active_jobs) + list(gen.pending_jobs):
                j.cancel()
            return
        for r in gen.iterate():
            if r["stage"] == "streaming":
                texts[r["identifier"]] += r.get("text", "")
                if r["eos"]:
                    reasons[r["identifier"]] = r["eos_reason"]
    for j, prompt, temp in jobs:
        reason = reasons.get(j)
        if reason == "max_new_tokens":
            continue
        why = checker(texts[j])
        if why:
            fail(ctx, seed, kind, f"direct generator (temperature {temp}, eos_reason {reason}): {why}",
                 {"prompt": prompt})


def round_schema(ctx: Ctx, seed: int, rng: random.Random) -> str:
    from exllamav2.generator.grammar import ExLlamaV2JsonSchemaFilter, GrammarError

    if rng.random() < 0.15:
        schema = bad_schema(rng)
        body = {"prompt": "x", "max_tokens": 5, "response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": schema}}}
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        if path.endswith("chat/completions"):
            body = {"messages": [{"role": "user", "content": "x"}], **{k: v for k, v in body.items()
                                                                       if k != "prompt"}}
        t0 = time.time()
        status, reply, raw = post(ctx, path, body, timeout=60)
        if status != 400:
            fail(ctx, seed, "schema", f"{path}: a schema llguidance cannot enforce gave HTTP {status} "
                                      f"(expected 400): {raw[:300]}", body)
        elif "response_format.json_schema.schema" not in raw:
            fail(ctx, seed, "schema", f"{path}: the 400 does not name response_format.json_schema.schema: "
                                      f"{raw[:300]}", body)
        if time.time() - t0 > 10:
            fail(ctx, seed, "schema", f"refusing a bad schema took {time.time() - t0:.1f} s", body)
        return f"bad schema -> {status}"
    schema = SchemaGen(rng).schema()
    try:
        ExLlamaV2JsonSchemaFilter(ctx.model, ctx.tok, schema)
    except GrammarError as e:
        # llguidance refuses it: the server must say so with a 400 naming the field
        body = {"prompt": "x", "max_tokens": 5, "response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": schema}}}
        status, _, raw = post(ctx, "/v1/completions", body)
        if status != 400 or "response_format.json_schema.schema" not in raw:
            fail(ctx, seed, "schema", f"refused schema ({e}) gave HTTP {status}: {raw[:300]}", body)
        return f"refused by llguidance: {str(e)[:80]}"
    checker = lambda text: check_json(text, schema)  # noqa: E731
    direct_filter(ctx, seed, "schema", rng, lambda: ExLlamaV2JsonSchemaFilter(ctx.model, ctx.tok, schema), checker,
                  rng.choice([60, 120]))
    wrap = rng.random()
    if wrap < 0.1:
        extra = {"guided_json": schema if rng.random() < 0.5 else json.dumps(schema)}
    else:
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema,
                                                                            "strict": True}}}
    server_structured(ctx, seed, "schema", rng, extra, checker, rng.choice([24, 64, 128]))
    return f"schema {len(json.dumps(schema))} chars"


def round_json_object(ctx: Ctx, seed: int, rng: random.Random) -> str:
    def checker(text):
        try:
            v = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not JSON ({e}): {text!r}"
        return None if isinstance(v, dict) else f"not an object: {text!r}"
    server_structured(ctx, seed, "schema", rng, {"response_format": {"type": "json_object"}}, checker,
                      rng.choice([16, 48]))
    return "json_object"


def _lang_checker(py_regex: str):
    rx = re.compile(py_regex, re.S)
    return lambda text: None if rx.fullmatch(text) else f"not in the language /{py_regex}/: {text!r}"


def round_regex(ctx: Ctx, seed: int, rng: random.Random) -> str:
    from exllamav2.generator.grammar import ExLlamaV2RegexFilter

    rx, py = random_regex(rng)
    checker = _lang_checker(py)
    direct_filter(ctx, seed, "regex", rng, lambda: ExLlamaV2RegexFilter(ctx.model, ctx.tok, rx), checker, 40)
    if rng.random() < 0.3:
        options = rng.sample(WORDS, rng.randint(1, 4))
        server_structured(ctx, seed, "regex", rng, {"guided_choice": options},
                          lambda t: None if t in options else f"not one of {options}: {t!r}", 32)
    else:
        server_structured(ctx, seed, "regex", rng, {"guided_regex": rx}, checker, 40)
    return f"regex /{rx}/"


def _round_grammar(ctx: Ctx, seed: int, rng: random.Random, kind: str) -> str:
    """A random Lark or GBNF grammar through the generator's filter and the server's guided_grammar."""
    from exllamav2.generator.grammar import ExLlamaV2EbnfFilter, ExLlamaV2LarkFilter

    filter_cls, make = ((ExLlamaV2LarkFilter, random_lark) if kind == "lark" else (ExLlamaV2EbnfFilter, random_ebnf))
    g, py = make(rng)
    checker = _lang_checker(py)
    direct_filter(ctx, seed, kind, rng, lambda: filter_cls(ctx.model, ctx.tok, g), checker, 40)
    server_structured(ctx, seed, kind, rng, {"guided_grammar": g}, checker, 40)
    return kind


def round_lark(ctx: Ctx, seed: int, rng: random.Random) -> str:
    return _round_grammar(ctx, seed, rng, "lark")


def round_ebnf(ctx: Ctx, seed: int, rng: random.Random) -> str:
    return _round_grammar(ctx, seed, rng, "ebnf")


TOOL_NAMES = ["get_weather", "add", "search_web", "lookup-user", "f1", "send_email"]


def random_tools(rng: random.Random) -> list[dict]:
    tools = []
    for name in rng.sample(TOOL_NAMES, rng.randint(1, 3)):
        sg = SchemaGen(rng)
        params = sg.obj(1)
        params["type"] = "object"
        if sg.defs:
            key = rng.choice(["$defs", "definitions"])
            params[key] = sg.defs
            params = json.loads(json.dumps(params).replace("#/$defs/", f"#/{key}/"))
        fn = {"name": name, "description": f"the {name} tool", "parameters": params}
        if rng.random() < 0.1:
            fn.pop("parameters")
        tools.append({"type": "function", "function": fn})
    return tools


def round_tools(ctx: Ctx, seed: int, rng: random.Random) -> str:
    tools = random_tools(rng)
    by_name = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}})
               for t in tools}
    from exllamav2.generator.grammar import ExLlamaV2JsonSchemaFilter, GrammarError
    for i, t in enumerate(tools):
        try:
            ExLlamaV2JsonSchemaFilter(ctx.model, ctx.tok, by_name[t["function"]["name"]])
        except GrammarError as e:
            body = {"messages": [{"role": "user", "content": "x"}], "tools": tools, "max_tokens": 4}
            status, _, raw = post(ctx, "/v1/chat/completions", body)
            if status != 400 or f"tools[{i}].function.parameters" not in raw:
                fail(ctx, seed, "tools", f"tools[{i}] parameters refused by llguidance ({e}) gave HTTP {status}: "
                                         f"{raw[:300]}", body)
            return f"tools[{i}] refused: {str(e)[:60]}"
    mode = rng.choice(["required", "named", "auto"])
    body: dict = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "tools": tools,
                  "max_tokens": rng.choice([48, 128])}
    if mode == "named":
        body["tool_choice"] = {"type": "function", "function": {"name": rng.choice(sorted(by_name))}}
    elif mode == "required":
        body["tool_choice"] = "required"
    elif rng.random() < 0.5:
        body["tool_choice"] = "auto"
    parallel = rng.choice([None, True, False])
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    rng_sampling(rng, body)
    body["stream"] = rng.random() < 0.5
    status, reply, raw = post(ctx, "/v1/chat/completions", body)
    if status != 200:
        fail(ctx, seed, "tools", f"HTTP {status}: {raw[:400]}", body)
        return f"tools {mode} -> {status}"
    c = reply["choices"][0]
    fr, msg = c.get("finish_reason"), c.get("message") or {}
    if body["stream"] and (not reply.get("done") or reply.get("error")):
        fail(ctx, seed, "tools", f"stream ended without [DONE] or with an error: {reply.get('error')}", body)
    calls = msg.get("tool_calls") or []
    if mode in ("required", "named") and fr != "length":
        if fr != "tool_calls" or not calls:
            fail(ctx, seed, "tools", f"tool_choice {mode}: finish_reason {fr!r}, no tool calls; content "
                                     f"{msg.get('content')!r}", body)
    if fr == "tool_calls" and not calls:
        fail(ctx, seed, "tools", "finish_reason tool_calls without tool_calls", body)
    if mode == "named" and calls:
        want = body["tool_choice"]["function"]["name"]
        if any(tc["function"]["name"] != want for tc in calls):
            fail(ctx, seed, "tools", f"named tool {want!r} but calls {[tc['function']['name'] for tc in calls]}",
                 body)
    if parallel is False and len(calls) > 1 and mode != "auto":
        fail(ctx, seed, "tools", f"parallel_tool_calls=false but {len(calls)} calls", body)
    for tc in calls:
        name = tc["function"]["name"]
        if name not in by_name:
            fail(ctx, seed, "tools", f"a call to an unknown tool {name!r}", body)
            continue
        try:
            args = json.loads(tc["function"]["arguments"])
        except (json.JSONDecodeError, TypeError) as e:
            fail(ctx, seed, "tools", f"arguments of {name} are not JSON ({e}): {tc['function']['arguments']!r}",
                 body)
            continue
        if mode != "auto":  # forced calls: the grammar guarantees the parameters schema
            why = validate(args, by_name[name])
            if why:
                fail(ctx, seed, "tools", f"{mode}: arguments of {name} invalid: {why}: {args!r}", body)
    if deterministic(body):
        again = {**body, "stream": not body["stream"]}
        status2, reply2, _ = post(ctx, "/v1/chat/completions", again)
        c2 = (reply2 or {}).get("choices", [{}])[0]
        m2 = c2.get("message") or {}
        norm = lambda m: (m.get("content") or "", [(t["function"]["name"], json.loads(t["function"]["arguments"]))  # noqa: E731
                                                    for t in m.get("tool_calls") or []])
        if status2 != 200 or norm(m2) != norm(msg) or c2.get("finish_reason") != fr:
            fail(ctx, seed, "tools", f"the same request streamed={body['stream']} vs {again['stream']} differs: "
                                     f"{norm(msg)} {fr} vs {norm(m2) if status2 == 200 else status2} "
                                     f"{c2.get('finish_reason')}", body)
    return f"tools {mode} -> {fr} ({len(calls)} calls)"


# --------------------------------------------------------------------------------------------------- bad requests

# no finite instance, and llguidance only finds out after '{"' (ParserTooComplex): the job fails mid-generation
RECURSIVE_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def bad_cases(rng: random.Random, max_seq_len: int) -> list[tuple[str, object, str | None]]:
    """(path, body, a word the error must name or None for 'any 4xx')."""
    m = [{"role": "user", "content": "hi"}]
    rfs = lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}  # noqa: E731
    return [
        (COMP, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        (COMP, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (COMP, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        (COMP, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        (COMP, {"prompt": "x", "temperature": -0.1}, "temperature"),
        (COMP, {"prompt": "x", "temperature": "hot"}, "temperature"),
        (COMP, {"prompt": "x", "top_p": 0}, "top_p"),
        (COMP, {"prompt": "x", "top_p": 1.5}, "top_p"),
        (COMP, {"prompt": "x", "n": 0}, "n"),
        (COMP, {"prompt": "x", "n": 10 ** 6}, "n"),
        (COMP, {"prompt": "x", "n": -3}, "n"),
        (COMP, {"prompt": "x", "logprobs": 100}, "logprobs"),
        (COMP, {"prompt": "x", "logprobs": -1}, "logprobs"),
        (COMP, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (COMP, {"prompt": "x", "stop": 5}, "stop"),
        (COMP, {"prompt": "x", "stream": "yes"}, "stream"),
        (COMP, {"prompt": "x", "seed": "abc"}, "seed"),
        (COMP, {"prompt": "x", "seed": 1.5}, "seed"),
        (COMP, {"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
        (COMP, {"prompt": "x", "frequency_penalty": -9}, "frequency_penalty"),
        (COMP, {"prompt": 123}, "prompt"),
        (COMP, {"prompt": None}, "prompt"),
        (COMP, {}, "prompt"),
        (COMP, {"prompt": ""}, "prompt"),
        (COMP, {"prompt": []}, "prompt"),
        (COMP, {"prompt": [1, 2, 3]}, "prompt"),
        (COMP, {"prompt": "x\ud800y"}, "prompt"),
        (COMP, {"prompt": "hello " * (max_seq_len * 2)}, "prompt"),
        (COMP, {"prompt": "z" * (max_seq_len * 40)}, "prompt"),
        (COMP, {"prompt": "x", "model": "gpt-9"}, "model"),
        (COMP, {"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
        (COMP, {"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
        (COMP, {"prompt": "x", "response_format": {}}, "response_format"),
        (COMP, {"prompt": "x", "response_format": "json"}, "response_format"),
        (COMP, {"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
        (COMP, {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a b",
                                                                                        "schema": {}}}},
         "response_format"),
        (COMP, {"prompt": "x", "response_format": rfs(bad_schema(rng))}, "response_format.json_schema.schema"),
        (COMP, {"prompt": "x", "response_format": rfs([1, 2])}, "response_format.json_schema.schema"),
        (COMP, {"prompt": "x", "guided_regex": "(?<=a)b"}, "guided_regex"),
        (COMP, {"prompt": "x", "guided_regex": ""}, "guided_regex"),
        (COMP, {"prompt": "x", "guided_grammar": "start: foo"}, "guided_grammar"),
        (COMP, {"prompt": "x", "guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        (COMP, {"prompt": "x", "guided_choice": []}, "guided_choice"),
        (COMP, {"prompt": "x", "guided_json": {"type": "integer", "minimum": 3, "maximum": 1}}, "guided_json"),
        (COMP, {"prompt": "x", "guided_json": "{not json"}, "guided_json"),
        (COMP, {"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        (COMP, {"prompt": "x", "interventions": [{"kind": "nope"}]}, "interventions"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        (CHAT, {"messages": [{"content": "x"}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
         "messages"),
        (CHAT, {"messages": [{"role": "user", "content": "a\udfffb"}]}, "content"),
        (CHAT, {"messages": [{"role": "user", "content": "word " * (max_seq_len * 2)}]}, "messages"),
        (CHAT, {"messages": m, "top_logprobs": 3}, "top_logprobs"),
        (CHAT, {"messages": m, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        (CHAT, {"messages": m, "logprobs": 3}, "logprobs"),
        (CHAT, {"messages": m, "max_completion_tokens": 0}, "max_completion_tokens"),
        (CHAT, {"messages": m, "tools": []}, "tools"),
        (CHAT, {"messages": m, "tools": [{"type": "function"}]}, "tools"),
        (CHAT, {"messages": m, "tools": "get_weather"}, "tools"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "array"}}}]}, "tools"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "format": "zzz"}}}}}]}, "tools"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "sometimes"}, "tool_choice"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": 7}, "tool_choice"),
        (CHAT, {"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"}}, "response_format"),
        (CHAT, {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": "{broken"}}]}, {"role": "user", "content": "x"}]}, "arguments"),
        (CHAT, {"messages": m, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        (CHAT, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None),
        (CHAT, b'\xff\xfe\x00{', None),
        (CHAT, "{\"messages\": [", None),
        (CHAT, "[]", None),
        (CHAT, "null", None),
        (CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
        (COMP, '{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
        # a schema whose parser grows too complex mid-generation: the job fails; the request must not hang
        (COMP, {"prompt": "JSON:", "max_tokens": 30, "response_format": rfs(RECURSIVE_REQUIRED)}, None),
        (COMP, '{"prompt": "x", "max_tokens": 99999999999999999999999999}', "max_tokens"),
        (COMP, {"prompt": "x", "max_tokens": 10 ** 9}, "max_tokens"),
        (CHAT, {"messages": m, "max_completion_tokens": max_seq_len + 1}, "max_completion_tokens"),
        (CHAT, {"messages": m, "max_tokens": 2 ** 63}, "max_tokens"),
    ]


def round_bad(ctx: Ctx, seed: int, rng: random.Random) -> str:
    cases = bad_cases(rng, ctx.engine.max_seq_len)
    picked = rng.sample(cases, min(len(cases), rng.randint(4, 10)))
    for path, body, word in picked:
        t0 = time.time()
        try:
            status, reply, raw = post(ctx, path, body, timeout=30)
        except httpx.TimeoutException:
            fail(ctx, seed, "bad", f"{path}: the request hung (no reply in 30 s)", _short(body))
            continue
        except httpx.HTTPError as e:
            fail(ctx, seed, "bad", f"{path}: the request failed at the HTTP level ({type(e).__name__}: {e})", body)
            continue
        dt = time.time() - t0
        if isinstance(body, dict) and status == 200:
            fail(ctx, seed, "bad", f"{path}: accepted (200), expected a 4xx naming {word!r}", _short(body))
            continue
        if not (400 <= status < 500):
            fail(ctx, seed, "bad", f"{path}: HTTP {status} (expected 4xx): {raw[:300]}", _short(body))
            continue
        if not isinstance(reply, dict) or "error" not in reply or not reply["error"].get("message"):
            fail(ctx, seed, "bad", f"{path}: the {status} is not an OpenAI-style error: {raw[:200]}", _short(body))
            continue
        if word is not None and word not in reply["error"]["message"] and word not in str(reply["error"].get("param")):
            fail(ctx, seed, "bad", f"{path}: the {status} does not name {word!r}: {reply['error']}", _short(body))
        if dt > 15:
            fail(ctx, seed, "bad", f"{path}: refusing took {dt:.1f} s", _short(body))
    check_baseline(ctx, seed, "bad")
    return f"{len(picked)} bad requests"


def _short(body):
    if isinstance(body, (bytes, str)):
        return repr(body[:200])
    return json.loads(json.dumps(body, default=str)[:2000]) if len(json.dumps(body, default=str)) < 2000 else \
        {k: (v if len(json.dumps(v, default=str)) < 200 else f"<{len(json.dumps(v, default=str))} chars>")
         for k, v in body.items()}


BASELINE = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}


def check_baseline(ctx: Ctx, seed: int, kind: str) -> None:
    status, reply, raw = post(ctx, COMP, BASELINE, timeout=60)
    if status != 200:
        fail(ctx, seed, kind, f"the server stopped serving: the baseline request gave HTTP {status}: {raw[:300]}")
        return
    text = reply["choices"][0]["text"]
    if ctx.baseline is None:
        ctx.baseline = text
    elif text != ctx.baseline:
        fail(ctx, seed, kind, f"the baseline greedy request changed: {ctx.baseline!r} -> {text!r}", BASELINE)


# --------------------------------------------------------------------------------------------------- concurrency


def _request_for(rng: random.Random, i: int) -> tuple[str, dict]:
    path = rng.choice([CHAT, COMP])
    prompt = rng.choice(PROMPTS) + (" " + " ".join(rng.choices(["more", "words", "here"], k=rng.randint(0, 30))))
    body: dict = {"max_tokens": rng.randint(4, 40)}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    t = rng.choice([0.0, 0.7, 1.2])
    body["temperature"] = t
    body["seed"] = rng.randint(0, 1000) if t > 0 else None
    if body["seed"] is None:
        del body["seed"]
    if rng.random() < 0.3:
        body["response_format"] = {"type": "json_object"}
    elif rng.random() < 0.15:
        body["guided_regex"] = "(yes|no), [0-9]{1,3}"
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.2 and path == COMP:
        body["logprobs"] = 2
    elif rng.random() < 0.2 and path == CHAT:
        body["logprobs"], body["top_logprobs"] = True, 2
    if rng.random() < 0.2:
        body["stop"] = [rng.choice([".", "\n", " the", "}"])]
    body["stream"] = rng.random() < 0.5
    return path, body


def _summary(reply: dict) -> list:
    out = []
    for c in reply.get("choices", []):
        out.append((choice_text(c), c.get("finish_reason")))
    return out


def round_concurrent(ctx: Ctx, seed: int, rng: random.Random) -> str:
    n = rng.randint(3, 8)
    reqs = [_request_for(rng, i) for i in range(n)]
    abandon = {i for i in range(n) if reqs[i][1]["stream"] and rng.random() < 0.35}
    alone = {}
    for i, (path, body) in enumerate(reqs):
        if i in abandon:
            continue
        status, reply, raw = post(ctx, path, body)
        if status != 200:
            fail(ctx, seed, "concurrent", f"alone: HTTP {status}: {raw[:300]}", body)
            return "alone failed"
        alone[i] = _summary(reply)
    results: dict = {}
    errors: dict = {}

    def worker(i):
        path, body = reqs[i]
        try:
            if i in abandon:
                client = httpx.Client(base_url=ctx.url, timeout=60)
                with client.stream("POST", path, json={**body, "max_tokens": 200}) as r:
                    got = 0
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            got += 1
                            if got >= rng_local[i]:
                                break
                client.close()  # closes the connection mid-stream
                results[i] = None
            else:
                with httpx.Client(base_url=ctx.url, timeout=120) as client:
                    if body.get("stream"):
                        with client.stream("POST", path, json=body) as r:
                            results[i] = (r.status_code, fold_stream(r.iter_lines(), chat=path == CHAT))
                    else:
                        r = client.post(path, json=body)
                        results[i] = (r.status_code, _json_or_none(r.text))
        except Exception as e:  # noqa: BLE001
            errors[i] = f"{type(e).__name__}: {e}"

    rng_local = {i: rng.randint(1, 4) for i in range(n)}
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
        time.sleep(rng.choice([0, 0, 0.01, 0.05]))
    for t in threads:
        t.join(timeout=300)
    if any(t.is_alive() for t in threads):
        fail(ctx, seed, "concurrent", f"requests hung (> 300 s): {[i for i, t in enumerate(threads) if t.is_alive()]}")
        return "hung"
    for i, why in errors.items():
        fail(ctx, seed, "concurrent", f"request {i} raised {why}", reqs[i][1])
    for i, want in alone.items():
        if i not in results:
            continue
        status, reply = results[i]
        if status != 200 or reply is None:
            fail(ctx, seed, "concurrent", f"request {i}: HTTP {status} among others", reqs[i][1])
            continue
        if reqs[i][1].get("stream") and (not reply.get("done") or reply.get("error")):
            fail(ctx, seed, "concurrent", f"request {i}: stream without [DONE] or with error {reply.get('error')}",
                 reqs[i][1])
        got = _summary(reply)
        if got != want:
            fail(ctx, seed, "concurrent", f"request {i} ({'stream' if reqs[i][1]['stream'] else 'plain'}) among "
                                          f"{n} ({len(abandon)} abandoned) gave {got!r}, alone {want!r}",
                 reqs[i][1])
    # the abandoned jobs must be cancelled: the generator drains and frees its pages
    gen = ctx.engine.generator
    deadline = time.time() + 30
    while time.time() < deadline and gen.num_remaining_jobs():
        time.sleep(0.05)
    if gen.num_remaining_jobs():
        fail(ctx, seed, "concurrent", f"{gen.num_remaining_jobs()} jobs still in the generator 30 s after all "
                                      f"clients finished or left")
    inner = gen.generator
    if hasattr(inner, "page_table") and inner.page_table.num_free_pages() != inner.page_table.num_pages:
        time.sleep(0.5)
        if inner.page_table.num_free_pages() != inner.page_table.num_pages:
            fail(ctx, seed, "concurrent", f"pages leaked: {inner.page_table.num_pages - inner.page_table.num_free_pages()}"
                                          f" of {inner.page_table.num_pages} still taken with no job")
    return f"{n} concurrent ({len(abandon)} abandoned) {time.time() - t0:.1f}s"


ROUNDS = {"schema": round_schema, "json_object": round_json_object, "regex": round_regex, "lark": round_lark,
          "ebnf": round_ebnf, "tools": round_tools, "bad": round_bad, "concurrent": round_concurrent}
WEIGHTS = {"schema": 6, "json_object": 1, "regex": 1, "lark": 1, "ebnf": 1, "tools": 3, "bad": 2, "concurrent": 2}


def run_round(ctx: Ctx, seed: int, kind: str | None = None, kinds=None) -> tuple[str, str, list]:
    """One round; returns (kind, summary, its failures)."""
    rng = random.Random(seed)
    pool = [k for k in ROUNDS if kinds is None or k in kinds]
    if kind is None:
        kind = rng.choices(pool, [WEIGHTS[k] for k in pool])[0]
    before = len(ctx.failures)
    try:
        summary = ROUNDS[kind](ctx, seed, rng)
    except Exception as e:  # noqa: BLE001
        fail(ctx, seed, kind, f"the round raised {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
        summary = "raised"
    return kind, summary, ctx.failures[before:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {sorted(ROUNDS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    if kinds and not kinds <= set(ROUNDS):
        ap.error(f"--kinds: unknown {sorted(kinds - set(ROUNDS))}; choose from {sorted(ROUNDS)}")
    t0 = time.time()
    ctx = setup()
    print(f"set up in {time.time() - t0:.1f} s", flush=True)
    try:
        check_baseline(ctx, -1, "setup")
        for r in range(args.rounds):
            seed = args.seed * 100003 + r
            t1 = time.time()
            kind, summary, fails = run_round(ctx, seed, kinds=kinds)
            print(f"round {r:3d} seed={seed} {kind:<11} {'FAIL' if fails else 'ok  '} {time.time() - t1:6.1f}s  "
                  f"{summary}", flush=True)
            for f in fails:
                print("  " + f.report().replace("\n", "\n  "), flush=True)
    finally:
        teardown(ctx)
    n = len(ctx.failures)
    print(f"{args.rounds} rounds, {n} failure{'s' if n != 1 else ''}, {time.time() - t0:.0f} s")
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
