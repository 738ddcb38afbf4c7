"""
Tool-call formats of model families, detected from the chat template, and the parsers that turn a model's output
into OpenAI `tool_calls` (used by the server for `tool_choice="auto"`, see server/structured.py).

- hermes:  Hermes, Qwen 2/2.5/3 and most tool-tuned ChatML models: `<tool_call>\\n{"name": ..., "arguments": {...}}
           \\n</tool_call>`, one block per call, possibly after some text.
- llama3:  Llama 3.1/3.2/3.3 JSON tool calling: the whole reply is `{"name": ..., "parameters": {...}}` (several
           separated by `;`), optionally after `<|python_tag|>`.
- mistral: `[TOOL_CALLS]` followed by a JSON list `[{"name": ..., "arguments": {...}}]` (v3 tokenizers) or by
           `name[ARGS]{...}` per call (v11+ tokenizers; `[CALL_ID]id` may sit between).
Templates that define none of these get the hermes format, described to the model in a system message
(see structured.py); its calls are parsed the same way.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

_DECODER = json.JSONDecoder()


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


def _call_from(obj) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str, separators: str = "") -> list | None:
    """Every JSON value in `text`, one after another, with whitespace or `separators` between; None if anything
    else is in it."""
    values, pos = [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)


class ToolCallFormat:
    name = "base"
    markers: tuple[str, ...] = ()  # text that begins a tool call
    only_at_start = False  # a call is the whole reply (no text before it)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls). No calls: the text unchanged as content."""
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """Streaming: where in `text` a tool call begins or may yet begin (len(text) when it cannot), so the text
        before it can be sent as content while the rest is held."""
        starts = [len(text)]
        search = text.lstrip() if self.only_at_start else text
        offset = len(text) - len(search)
        for marker in self.markers:
            if self.only_at_start:
                if search.startswith(marker) or (search and marker.startswith(search)):
                    starts.append(offset)
                continue
            at = search.find(marker)
            if at >= 0:
                starts.append(offset + at)
            for n in range(min(len(marker) - 1, len(search)), 0, -1):  # a marker cut at the end of the text
                if search.endswith(marker[:n]):
                    starts.append(offset + len(search) - n)
                    break
        return min(starts)


class HermesFormat(ToolCallFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        calls = []
        for body in self._block.findall(text):
            values = _json_values(body)
            if not values:
                return text, []
            for v in values:
                call = _call_from(v)
                if call is None:
                    return text, []
                calls.append(call)
        if not calls:
            return text, []
        content = self._block.sub("", text).strip()
        return content or None, calls


class Llama3JsonFormat(ToolCallFormat):
    name = "llama3"
    markers = ("<|python_tag|>", "{")
    only_at_start = True

    def parse(self, text):
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        values = _json_values(body, ";")
        if not values:
            return text, []
        calls = [_call_from(v) for v in values]
        if any(c is None for c in calls):
            return text, []
        return None, calls


class MistralFormat(ToolCallFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _v11 = re.compile(r"\s*([A-Za-z0-9_\-.]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]+\s*)?\[ARGS\]")

    def parse(self, text):
        at = text.find("[TOOL_CALLS]")
        if at < 0:
            return text, []
        content = text[:at].strip() or None
        rest = text[at + len("[TOOL_CALLS]"):]
        calls: list[ParsedCall] = []
        values = _json_values(rest)
        if values:  # v3: a JSON list of calls (or one call object)
            for v in values:
                for item in v if isinstance(v, list) else [v]:
                    call = _call_from(item)
                    if call is None:
                        return text, []
                    calls.append(call)
            return content, calls
        pos = 0
        while pos < len(rest):  # v11+: name[ARGS]{...} per call
            m = self._v11.match(rest, pos)
            if m is None:
                if rest[pos:].strip() in ("", "[TOOL_CALLS]"):
                    break
                if rest.startswith("[TOOL_CALLS]", pos):
                    pos += len("[TOOL_CALLS]")
                    continue
                return text, []
            try:
                args, pos = _DECODER.raw_decode(rest, m.end())
            except json.JSONDecodeError:
                return text, []
            call = _call_from({"name": m.group(1), "arguments": args})
            if call is None:
                return text, []
            calls.append(call)
            while pos < len(rest) and rest[pos].isspace():
                pos += 1
        return (content, calls) if calls else (text, [])


FORMATS = {f.name: f for f in (HermesFormat(), Llama3JsonFormat(), MistralFormat())}


def detect_format(template_source: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template defines, or None when it defines none."""
    src = template_source or ""
    if "[TOOL_CALLS]" in src:
        return FORMATS["mistral"]
    if "<tool_call>" in src:
        return FORMATS["hermes"]
    if "<|python_tag|>" in src or ("ipython" in src and "parameters" in src):
        return FORMATS["llama3"]
    return None


def render_calls(fmt: ToolCallFormat, calls: list[dict]) -> str:
    """An assistant turn's tool calls as the model would have written them ({"name", "arguments": dict}), for
    templates that do not render `tool_calls` themselves."""
    if fmt.name == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls])
    if fmt.name == "llama3":
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    return "\n".join("<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + "\n</tool_call>"
                     for c in calls)
