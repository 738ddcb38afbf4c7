"""Structured output and tool calling on a live server (SmolLM2-135M-Instruct, its real weights), driven by the
official `openai` client: JSON-schema replies parse and validate, streamed and not, in chat and completions;
required and named tool choices always give valid calls; auto gives calls or text; a two-turn tool conversation
round-trips; bad schemas and tools are 400s naming the parameter."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from contextlib import redirect_stdout

import httpx
import jsonschema
import openai
import pytest

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic_async import ExLlamaV2DynamicGeneratorAsync
from exllamav2.server import ServerEngine, start_in_thread

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "teacher"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3},
        "manager": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "address", "skills", "manager"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
MODEL = "SmolLM2-135M-Instruct"  # the name the README's examples use
ASK_PERSON = [{"role": "user", "content": "Invent an engineer called Ann who lives in Paris. Reply in JSON."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(smollm2_default):
    model, tok = smollm2_default
    cache = ExLlamaV2Cache(model, 1, 4096)
    gen = ExLlamaV2DynamicGeneratorAsync(model, cache, tok, max_batch_size=8, page_size=256)
    engine = ServerEngine(model, tok, gen, MODEL, max_queue=32)
    srv = start_in_thread(engine)
    yield srv, engine
    srv.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="none", max_retries=0, timeout=300)


def schema_format(schema, name="reply"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def streamed_chat(client, **kw):
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def check_call(name, arguments):
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_json_schema_reply_validates_streamed_and_not(client):
    kw = dict(model=MODEL, messages=ASK_PERSON, response_format=schema_format(PERSON), max_tokens=160)
    r = client.chat.completions.create(temperature=0, **kw)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    content, calls, finish = streamed_chat(client, temperature=0.8, seed=5, **kw)
    assert finish == "stop" and not calls
    jsonschema.validate(json.loads(content), PERSON)


def test_json_object_in_completions_streamed_and_not(client):
    prompt = "A JSON object describing a cat:\n"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=120, extra_body={"response_format": {"type": "json_object"}})
    r = client.completions.create(temperature=0, **kw)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{")
    schema = {"type": "object", "properties": {"color": {"enum": ["black", "white", "orange"]},
                                               "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["color", "lives"], "additionalProperties": False}
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
        extra_body={"response_format": schema_format(schema)}) if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_guided_regex_choice_and_grammar(client):
    r = client.completions.create(model=MODEL, prompt="Today's date is", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=5, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].message.content in ("yes", "no", "maybe")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a color."}],
                                       max_tokens=10, temperature=0,
                                       extra_body={"guided_grammar": 'root ::= "color: " ("red" | "blue")'})
    assert r.choices[0].message.content in ("color: red", "color: blue")
    for body, param in (({"guided_regex": "(?<=a)b"}, "guided_regex"), ({"guided_grammar": "start: nope"},
                                                                         "guided_grammar"),
                        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=body)
        assert e.value.body["param"] == param, e.value.body


def test_required_and_named_tool_choice_always_give_valid_calls(client):
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=120)
        choice = r.choices[0]
        # a reply cut by max_tokens keeps its complete calls (and says "length")
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            check_call(call.function.name, call.function.arguments)
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert len(r.choices[0].message.tool_calls) == 1
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                       tools=TOOLS, tool_choice=named, temperature=0, max_tokens=40)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
    check_call("add", call.function.arguments)
    content, calls, finish = streamed_chat(client, model=MODEL, messages=ASK_WEATHER, tools=TOOLS,
                                           tool_choice=named, temperature=0, max_tokens=40)
    assert finish == "tool_calls" and len(calls) == 1 and calls[0]["name"] == "add" and calls[0]["id"]
    check_call("add", calls[0]["arguments"])


def test_auto_returns_calls_or_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="auto",
                                       temperature=0, max_tokens=60)
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            check_call(call.function.name, call.function.arguments)
    else:
        assert message.content and r.choices[0].finish_reason in ("stop", "length")


def test_two_turn_tool_conversation(client):
    messages = list(ASK_WEATHER)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       temperature=0, max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21,
                                                                                     "sky": "sunny"})})
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=30)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 10  # the call and its result are in the prompt
    msg = r2.choices[0].message
    assert msg.content or msg.tool_calls
    r3 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=30)
    assert r3.choices[0].message.content and not r3.choices[0].message.tool_calls


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": schema_format({"type": "foo"})}, "response_format.json_schema.schema", "foo"),
    ({"response_format": schema_format({"type": "string", "format": "no-such"})},
     "response_format.json_schema.schema", "format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "duplicate"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 3, "maximum": 1}}, "required": ["x"]}}}]},
     "tools[0].function.parameters", "unsatisfiable"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool"),
])
def test_bad_schemas_and_tools_are_400s(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, **body) \
            if "tools" in body or "tool_choice" in body else \
            client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4,
                                           extra_body={"response_format": body["response_format"]})
    err = e.value.body if isinstance(e.value.body, dict) else {}
    assert err.get("param") == param, err
    assert words.lower() in err.get("message", "").lower(), err


def test_bad_assistant_tool_call_arguments_are_400(client):
    messages = ASK_WEATHER + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "not json"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4)
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.arguments"


# ------------------------------------------------------------------------------------------ the README's examples

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_blocks(lang: str) -> list[str]:
    text = open(README, encoding="utf8").read()
    section = text.split("## Structured output and tool calling\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_readme_filter_example_runs(smollm2_default):
    from exllamav2 import ExLlamaV2Cache

    model, tok = smollm2_default
    (code,) = [b for b in readme_blocks("python") if "ExLlamaV2JsonSchemaFilter" in b]
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "README.md structured output", "exec"),
             {"model": model, "tokenizer": tok, "cache": ExLlamaV2Cache(model, max_seq_len=512)})
    first, second = out.getvalue().strip().splitlines()
    reply = eval(first, {})  # the printed dict
    assert set(reply) == {"city", "population"} and isinstance(reply["population"], int)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", second)


def test_readme_curl_example(server):
    (block,) = readme_blocks("bash")
    args = shlex.split(block.replace("\\\n", " "))
    url = args[1].replace("http://127.0.0.1:8000", server[0].url)
    body = json.loads(args[args.index("-d") + 1])
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer secret"}, timeout=300)
    assert r.status_code == 200, r.text
    schema = body["response_format"]["json_schema"]["schema"]
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


def test_readme_openai_example(server):
    (code,) = [b for b in readme_blocks("python") if "OpenAI(" in b]
    code = code.replace("http://127.0.0.1:8000", server[0].url)
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "README.md tool calling", "exec"), {})
    first = out.getvalue().splitlines()[0]
    name, args = first.split(" ", 1)
    assert name == "get_weather" and "city" in eval(args, {})
