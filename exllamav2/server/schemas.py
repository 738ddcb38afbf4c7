"""Request bodies of the OpenAI-compatible API (pydantic). Unknown fields are ignored; wrong types and impossible
values are rejected (strict types: "0.5" is not a temperature)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

def check_unicode(value, what: str = "text"):
    """Strings must be valid Unicode (encodable as UTF-8): JSON lets a client send a lone surrogate such as
    \\ud800, which no tokenizer can take."""
    items = value if isinstance(value, list) else [value]
    for k, item in enumerate(items):
        text = item.text if isinstance(item, TextPart) else item
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"{what}[{k}]" if isinstance(value, list) else what
            if isinstance(item, TextPart):
                where += ".text"
            raise ValueError(f"{where} is not valid Unicode: a lone surrogate (\\u{ord(text[e.start]):04x}) at "
                             f"character {e.start}") from None
    return value


Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0)]
Probability = Annotated[float, Field(strict=True, gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    seed: StrictInt | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=16)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: StrictStr | None = None
    interventions: list[dict[str, Any]] | None = None
    # checked in server/structured.py, where a bad schema gets a message naming its place
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None  # vLLM's names for the same constraints
    guided_regex: StrictStr | None = None
    guided_grammar: StrictStr | None = None  # Lark, or GBNF when it holds "::="
    guided_choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return check_unicode(v, "stop")

    @field_validator("model", "user")
    @classmethod
    def _text(cls, v, info):
        return check_unicode(v, info.field_name)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return check_unicode(v, "prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr | dict[str, Any]


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content", "name")
    @classmethod
    def _text(cls, v, info):
        return check_unicode(v, info.field_name)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    tools: list[Any] | None = None  # checked in server/structured.py
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
