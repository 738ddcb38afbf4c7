"""
Structured output and tool calling for the server: what a request's `response_format`, `tools`, `tool_choice` and
`parallel_tool_calls` mean for its jobs (grammar filters from generator/grammar/), its prompt (the tools go through
the chat template's `tools` variable) and its reply (`tool_calls`, parsed by server/tool_formats.py).

- response_format json_object / json_schema: every job gets that grammar; a schema the grammar library cannot
  enforce is a 400 naming `response_format.json_schema.schema`.
- tool_choice "required": the reply is grammar-forced to a JSON list of calls `[{"name": ..., "arguments": {...}}]`
  (one call with parallel_tool_calls=false), each call's arguments valid against that function's parameters.
  A named function: the reply is forced to that function's arguments object. Either way the calls always parse.
- vLLM's `guided_json`, `guided_regex`, `guided_grammar` (Lark or GBNF) and `guided_choice` constrain the reply
  the same way.
- "auto": the model writes freely; the reply is parsed in the tool-call format its template defines (hermes,
  llama3 or mistral), and text that is no call stays content. "none": no tools in the prompt, no parsing.
A template that does not take `tools` (SmolLM2's, for one) gets them in a system message in the hermes format,
and assistant tool calls / tool results are written into the turns it renders.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .tool_formats import FORMATS, ToolCallFormat, detect_format, render_calls

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class StructuredRequestError(ValueError):
    """A 400: `param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class OutputPlan:
    grammar: tuple[str, Any] | None = None  # (kind, spec) every job is constrained to
    tool_mode: str | None = None  # None (no tools), "auto", "required", "named"
    tools: list[dict] = field(default_factory=list)  # the validated `function` objects
    named: str | None = None
    parallel: bool = True
    fmt: ToolCallFormat | None = None  # the reply format parsed in auto mode

    @property
    def parses_tools(self) -> bool:
        return self.tool_mode in ("auto", "required", "named")

    def make_filters(self, model, tokenizer) -> list:
        if self.grammar is None:
            return []
        from ..generator.grammar import ExLlamaV2GrammarFilter
        return [ExLlamaV2GrammarFilter(model, tokenizer, *self.grammar)]

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, OpenAI tool_calls) of a finished reply; no calls when it holds none (or is cut short)."""
        if self.tool_mode == "named":
            try:
                args = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            return None, [_tool_call(self.named, args)]
        if self.tool_mode == "required":
            items = _complete_items(text)
            if not items:
                return text, []
            return None, [_tool_call(i["name"], i["arguments"]) for i in items]
        if self.tool_mode == "auto":
            content, calls = self.fmt.parse(text)
            known = {t["name"] for t in self.tools}
            if not calls or any(c.name not in known for c in calls):
                return text, []
            return content, [_tool_call(c.name, json.loads(c.arguments)) for c in calls]
        return text, []


def _complete_items(text: str) -> list:
    """The complete items of a JSON list, also of one cut short by the token limit (the grammar guarantees each
    complete item is a valid call)."""
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        return []
    pos += 1
    items = []
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items
        items.append(item)


def _tool_call(name: str, arguments: Any) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


# ------------------------------------------------------------------------------------------ request checks


def _compile(model, tokenizer, kind: str, spec, param: str):
    """Compile (and cache) a grammar now, so a bad one is a 400 before any job starts."""
    from ..generator.grammar import GrammarError, default_cache
    from ..generator.grammar.compiler import vocab_size_of
    try:
        default_cache.matcher(tokenizer, vocab_size_of(model, tokenizer), kind, spec)
    except GrammarError as e:
        raise StructuredRequestError(param, str(e)) from None
    except ImportError as e:
        raise StructuredRequestError(param, str(e)) from None


def response_format_grammar(model, tokenizer, rf) -> tuple[str, Any] | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise StructuredRequestError("response_format", f"must be an object, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind in (None, "text"):
        if kind is None:
            raise StructuredRequestError("response_format.type", "is required: 'text', 'json_object' or "
                                                                  "'json_schema'")
        return None
    if kind == "json_object":
        return ("json_object", None)
    if kind != "json_schema":
        raise StructuredRequestError("response_format.type", f"must be 'text', 'json_object' or 'json_schema', "
                                                             f"got {kind!r}")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise StructuredRequestError("response_format.json_schema", "must be an object with 'name' and 'schema'")
    name = js.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise StructuredRequestError("response_format.json_schema.name",
                                     "must be 1-64 letters, digits, underscores or dashes")
    schema = js.get("schema")
    if schema is None:
        return ("json_object", None)
    if not isinstance(schema, (dict, bool)):
        raise StructuredRequestError("response_format.json_schema.schema",
                                     f"must be a JSON Schema object, got {type(schema).__name__}")
    _compile(model, tokenizer, "json_schema", schema, "response_format.json_schema.schema")
    return ("json_schema", schema)


def guided_grammar(model, tokenizer, req) -> tuple[str, Any] | None:
    """vLLM's `guided_json`, `guided_regex`, `guided_grammar` (Lark, or GBNF when it holds '::=') and
    `guided_choice`; at most one, and not with a JSON response_format."""
    given = [(name, getattr(req, name, None)) for name in ("guided_json", "guided_regex", "guided_grammar",
                                                           "guided_choice")]
    given = [(n, v) for n, v in given if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise StructuredRequestError(given[1][0], f"only one guided_* constraint per request (also {given[0][0]})")
    name, value = given[0]
    if name == "guided_json":
        kind = "json_schema"
    elif name == "guided_regex":
        kind = "regex"
    elif name == "guided_grammar":
        kind = "ebnf" if "::=" in value else "lark"
    else:
        kind, value = "lark", "start: " + " | ".join(json.dumps(c) for c in value)
    _compile(model, tokenizer, kind, value, name)
    return (kind, value)


def _check_tools(model, tokenizer, tools) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise StructuredRequestError("tools", "must be a non-empty list of {'type': 'function', 'function': {...}}")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise StructuredRequestError(where, "must be {'type': 'function', 'function': {'name': ..., "
                                                "'parameters': {...}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise StructuredRequestError(f"{where}.function.name",
                                         f"must be 1-64 letters, digits, underscores or dashes, got {name!r}")
        if name in names:
            raise StructuredRequestError(f"{where}.function.name", f"duplicate function name {name!r}")
        names.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise StructuredRequestError(f"{where}.function.description", "must be a string")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise StructuredRequestError(f"{where}.function.parameters",
                                         f"must be a JSON Schema object, got {type(params).__name__}")
        if params.get("type", "object") != "object":
            raise StructuredRequestError(f"{where}.function.parameters",
                                         f"must describe an object (type 'object'), got type {params.get('type')!r}")
        _compile(model, tokenizer, "json_schema", params, f"{where}.function.parameters")
        out.append({**f, "parameters": params})
    return out


# keywords whose value is a JSON value (not a schema): a "$ref" inside one is data, not a reference
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
# keywords whose value maps names to schemas
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _rebase_refs(schema, base: str):
    """`schema` with every local `$ref` ("#...") rewritten to point below `base` ("#/$defs/x"), so the schema can
    sit inside a larger one and its `#/$defs/...` references (and recursive "#") still resolve."""
    if isinstance(schema, list):
        return [_rebase_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebase_refs(sub, base) for name, sub in value.items()}
        else:
            out[key] = _rebase_refs(value, base)
    return out


def _required_schema(tools: list[dict], parallel: bool) -> dict:
    # each tool's parameters sit in the root's $defs, their local references rebased, so a parameters schema
    # with its own $defs / definitions / recursive "#" compiles as it does alone (a named tool_choice)
    defs = {f"tool_{i}": _rebase_refs(t["parameters"], f"#/$defs/tool_{i}") for i, t in enumerate(tools)}
    calls = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": {"$ref": f"#/$defs/tool_{i}"}},
              "required": ["name", "arguments"], "additionalProperties": False} for i, t in enumerate(tools)]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
              "$defs": defs}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan_output(model, tokenizer, req, template_source: str | None = None) -> OutputPlan:
    """What the request's structured-output and tool fields ask for; StructuredRequestError (a 400) otherwise."""
    plan = OutputPlan(grammar=response_format_grammar(model, tokenizer, getattr(req, "response_format", None)))
    guided = guided_grammar(model, tokenizer, req)
    if guided is not None:
        if plan.grammar is not None:
            raise StructuredRequestError("response_format", "a JSON response_format and a guided_* constraint "
                                                            "cannot be combined")
        plan.grammar = guided
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    parallel = getattr(req, "parallel_tool_calls", None)
    if tools is None:
        if choice not in (None, "none"):
            raise StructuredRequestError("tool_choice", "needs `tools`")
        return plan
    plan.tools = _check_tools(model, tokenizer, tools)
    plan.parallel = True if parallel is None else bool(parallel)
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise StructuredRequestError("tool_choice", "must be 'none', 'auto', 'required' or "
                                                        "{'type': 'function', 'function': {'name': ...}}")
        by_name = {t["name"]: t for t in plan.tools}
        if fn["name"] not in by_name:
            raise StructuredRequestError("tool_choice.function.name",
                                         f"{fn['name']!r} is not one of the tools {sorted(by_name)}")
        plan.tool_mode, plan.named = "named", fn["name"]
        chosen_grammar = ("json_schema", by_name[fn["name"]]["parameters"])
    elif choice == "none":
        plan.tool_mode = None
        plan.tools = []
        return plan
    elif choice == "required":
        plan.tool_mode = "required"
        chosen_grammar = ("json_schema", _required_schema(plan.tools, plan.parallel))
    elif choice == "auto":
        plan.tool_mode = "auto"
        plan.fmt = detect_format(template_source) or FORMATS["hermes"]
        chosen_grammar = None
    else:
        raise StructuredRequestError("tool_choice", f"must be 'none', 'auto', 'required' or a named function, "
                                                    f"got {choice!r}")
    if plan.grammar is not None:
        raise StructuredRequestError("response_format", "constrains the reply to JSON, so the model could not call "
                                                        "tools; use it with tool_choice 'none' or without tools")
    if chosen_grammar is not None:
        _compile(model, tokenizer, *chosen_grammar, "tools")
        plan.grammar = chosen_grammar
    return plan


# ------------------------------------------------------------------------------------------ the prompt


def template_takes_tools(source: str | None) -> bool:
    return bool(source) and "tools" in source


def template_renders_tool_calls(source: str | None) -> bool:
    return bool(source) and "tool_calls" in source


def _arguments_object(arguments, where: str):
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        raise StructuredRequestError(where, "must be a JSON object (as text)") from None
    if not isinstance(value, dict):
        raise StructuredRequestError(where, "must be a JSON object (as text)")
    return value


def tools_system_text(tools: list[dict]) -> str:
    """The hermes tool instructions (as Qwen 2.5's template writes them), for templates without tool support."""
    lines = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + lines +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def chat_messages(req, plan: OutputPlan, template_source: str | None) -> tuple[list[dict], dict]:
    """(messages, template kwargs) for the chat template. Assistant tool calls carry their arguments as objects
    (as HF templates expect); templates that render neither tools nor tool calls get them as text."""
    takes_tools = template_takes_tools(template_source)
    renders_calls = template_renders_tool_calls(template_source)
    fmt = plan.fmt or detect_format(template_source) or FORMATS["hermes"]
    messages = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        calls = getattr(m, "tool_calls", None)
        if calls:
            if m.role != "assistant":
                raise StructuredRequestError(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
            parsed = [{"name": c.function.name,
                       "arguments": _arguments_object(c.function.arguments,
                                                      f"messages[{i}].tool_calls[{k}].function.arguments"),
                       "id": c.id} for k, c in enumerate(calls)]
            if renders_calls:
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}} for c in parsed]
            else:
                text = render_calls(fmt, parsed)
                msg["content"] = (msg["content"] + "\n" + text) if msg["content"] else text
        if m.role == "tool":
            if getattr(m, "tool_call_id", None) is not None:
                msg["tool_call_id"] = m.tool_call_id
            if not renders_calls:
                msg["content"] = "<tool_response>\n" + msg["content"] + "\n</tool_response>"
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    kwargs: dict[str, Any] = {}
    if plan.tools:
        if takes_tools:
            kwargs["tools"] = [{"type": "function", "function": t} for t in plan.tools]
        else:
            text = tools_system_text(plan.tools)
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
            else:
                messages.insert(0, {"role": "system", "content": text})
    return messages, kwargs


# ------------------------------------------------------------------------------------------ streaming replies


class ReplyStream:
    """One streamed choice of a request with tools: text goes out as content up to where a tool call begins or
    may yet begin; the rest is held until the reply ends and is then sent as tool calls, or as content when it
    held none. With required or named tools the whole reply is the call."""

    def __init__(self, plan: OutputPlan):
        self.plan, self.full, self.sent = plan, "", 0

    def feed(self, text: str) -> str:
        """Content to send now."""
        self.full += text
        if self.plan.tool_mode != "auto":
            return ""
        limit = self.plan.fmt.hold_from(self.full)
        if limit <= self.sent:
            return ""
        out, self.sent = self.full[self.sent:limit], limit
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls)."""
        _, calls = self.plan.parse(self.full)
        if calls:
            return "", calls
        rest, self.sent = self.full[self.sent:], len(self.full)
        return rest, []
