"""Render a model's chat template (jinja2, sandboxed) the way HF transformers renders it."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or the template refused the conversation."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def select_chat_template(
    templates: str | dict[str, str] | None, origin: str, template_name: str | None = None, has_tools: bool = False
) -> str:
    """Pick one template source from what the model ships: a string or named templates."""
    if templates is None or templates == {}:
        raise ChatTemplateError(f"{origin}: the model has no chat template (no 'chat_template' in tokenizer_config.json, "
                                "no chat_template.jinja, no GGUF 'tokenizer.chat_template')")
    if isinstance(templates, str):
        if template_name not in (None, "default"):
            raise ChatTemplateError(f"{origin}: the model has a single chat template, not one named {template_name!r}")
        return templates
    if template_name is not None:
        if template_name not in templates:
            raise ChatTemplateError(f"{origin}: no chat template named {template_name!r}; available: {sorted(templates)}")
        return templates[template_name]
    if has_tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(f"{origin}: named chat templates {sorted(templates)} include no 'default'; pass template_name")


def normalize_chat_templates(value: Any, origin: str) -> str | dict[str, str] | None:
    """`chat_template` as tokenizer_config.json stores it: a string or a list of {name, template}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return {entry["name"]: entry["template"] for entry in value}
        except (TypeError, KeyError) as e:
            raise ValueError(f"{origin}: 'chat_template' list entries need 'name' and 'template'") from e
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"{origin}: 'chat_template' must be a string or a list of named templates, got {type(value).__name__}")


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    special_tokens: dict[str, str | None],
    **template_kwargs: Any,
) -> str:
    variables = {k: v for k, v in special_tokens.items() if v is not None}
    variables.update(template_kwargs)  # caller's values win over the special-token names
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return compile_chat_template(source).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )


def content_spans(render, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int] | None]]:
    """Render a conversation and find where each message's `content` (a str) lies in the text.

    `render(messages) -> str` renders the template. Returns (text, spans): spans[i] is (start, end) of message i's
    content in text, or None where it has none or it cannot be found (the template rewrote it). The template is
    rendered a second time with a unique placeholder per content; where substituting the contents back gives
    the same text, the spans are exact; otherwise each content is searched for in order."""
    text = render(messages)
    spans: list[tuple[int, int] | None] = [None] * len(messages)
    idx = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str) and m["content"]]
    if not idx:
        return text, spans
    nonce = uuid.uuid4().hex[:12]
    marks = {i: f"\ue000{nonce}:{i}\ue001" for i in idx}
    try:
        marked = render([dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)])
    except Exception:
        marked = None
    if marked is not None:
        out, found, pos = [], [None] * len(messages), 0
        for piece in re.split(f"(\ue000{nonce}:\\d+\ue001)", marked):
            m = re.fullmatch(f"\ue000{nonce}:(\\d+)\ue001", piece)
            if m and found[int(m.group(1))] is None:
                content = messages[int(m.group(1))]["content"]
                found[int(m.group(1))] = (pos, pos + len(content))
                piece = content
            out.append(piece)
            pos += len(piece)
        if "".join(out) == text:
            return text, found
    pos = 0
    for i in idx:
        content = messages[i]["content"]
        for candidate in (content, content.strip()):
            at = text.find(candidate, pos) if candidate else -1
            if at >= 0:
                spans[i] = (at, at + len(candidate))
                pos = at + len(candidate)
                break
    return text, spans
