"""Tool-call formats (exllamav2/server/tool_formats.py) and the prompt side of tool calling
(exllamav2/server/structured.py), without a model: parsing each family's output, what streaming may send before a
call, format detection from templates, and tools / tool turns rendered through templates with and without tool
support."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from exllamav2.server.schemas import ChatCompletionRequest
from exllamav2.server.structured import OutputPlan, ReplyStream, chat_messages
from exllamav2.server.tool_formats import FORMATS, detect_format, render_calls
from exllamav2.tokenizer.chat_template import render_chat_template

HERMES, LLAMA3, MISTRAL = FORMATS["hermes"], FORMATS["llama3"], FORMATS["mistral"]

# the shape of Qwen 2.5's template (tools in the system turn, <tool_call> blocks, tool results as user turns)
QWEN_LIKE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}
# Tools
<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools>
For each function call, return <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'system' and tools %}{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for tc in m.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
PLAIN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_LIKE = "{% if tools %}Respond with {\"name\": name, \"parameters\": dict}. ipython{% endif %}<|python_tag|>"
MISTRAL_LIKE = "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% if m %}[TOOL_CALLS]{% endif %}"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def test_hermes_calls_and_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    content, calls = HERMES.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("add", {"a": 1, "b": 2})]
    # unclosed last block (the model stopped at EOS right after the JSON)
    assert HERMES.parse('<tool_call>{"name": "f", "arguments": {}}')[1][0].name == "f"
    for not_a_call in ("plain text", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                       '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'):
        assert HERMES.parse(not_a_call) == (not_a_call, [])


def test_llama3_json_calls():
    content, calls = LLAMA3.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    _, calls = LLAMA3.parse('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}')
    assert [c.name for c in calls] == ["a", "b"]
    for not_a_call in ('{"city": "Oslo"}', 'The answer is {"name": "a", "parameters": {}}', "{broken"):
        assert LLAMA3.parse(not_a_call) == (not_a_call, [])


def test_mistral_calls_both_tokenizer_versions():
    content, calls = MISTRAL.parse('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                                   '{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert content is None and [c.name for c in calls] == ["get_weather", "add"]
    content, calls = MISTRAL.parse('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]add[CALL_ID]'
                                   'a1B2c3D4e[ARGS]{"a": 1, "b": 2}')
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome"}), ("add", {"a": 1, "b": 2})]
    for not_a_call in ("no calls", "[TOOL_CALLS]get_weather[ARGS]{oops", "[TOOL_CALLS][1, 2]"):
        assert MISTRAL.parse(not_a_call) == (not_a_call, [])


def test_streaming_holds_back_only_what_may_be_a_call():
    assert HERMES.hold_from("Hello there") == len("Hello there")
    assert HERMES.hold_from("Hello <tool") == len("Hello ")
    assert HERMES.hold_from('Hi <tool_call>{"na') == len("Hi ")
    assert LLAMA3.hold_from('  {"name"') == 2 and LLAMA3.hold_from("Paris is") == len("Paris is")
    assert LLAMA3.hold_from("<|pyth") == 0
    assert MISTRAL.hold_from("ok [TOOL_") == 3

    plan = OutputPlan(tool_mode="auto", tools=[TOOL["function"]], fmt=HERMES)
    stream = ReplyStream(plan)
    sent = [stream.feed(t) for t in ["Checking", " now <tool", "_call>", '{"name": "get_weather", ',
                                     '"arguments": {"city": "Paris"}}</tool_call>']]
    assert "".join(sent) == "Checking now "
    rest, calls = stream.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    stream = ReplyStream(plan)
    assert stream.feed("a <tool") == "a "
    assert stream.finish() == ("<tool", [])  # it was not a call after all: sent as content at the end


def test_auto_ignores_calls_to_unknown_functions():
    plan = OutputPlan(tool_mode="auto", tools=[TOOL["function"]], fmt=HERMES)
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert plan.parse(text) == (text, [])


def test_required_keeps_complete_calls_of_a_cut_reply():
    plan = OutputPlan(tool_mode="required", tools=[TOOL["function"]])
    _, calls = plan.parse('[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_weather", "argu')
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert plan.parse('[{"name": "get_w') == ('[{"name": "get_w', [])


def test_format_detection_from_templates():
    assert detect_format(QWEN_LIKE) is HERMES
    assert detect_format(LLAMA3_LIKE) is LLAMA3
    assert detect_format(MISTRAL_LIKE) is MISTRAL
    assert detect_format(PLAIN) is None and detect_format(None) is None


def _request(messages, tools=None, tool_choice=None):
    return ChatCompletionRequest(messages=messages, tools=tools, tool_choice=tool_choice)


def _render(source, req, plan):
    messages, kwargs = chat_messages(req, plan, source)
    return render_chat_template(source, messages, True, {}, **kwargs)


TURNS = [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]


def test_tools_and_tool_turns_go_through_a_template_that_takes_them():
    plan = OutputPlan(tool_mode="auto", tools=[TOOL["function"]], fmt=HERMES)
    text = _render(QWEN_LIKE, _request(TURNS, [TOOL]), plan)
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the tool definition, from the template
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_without_tools_gets_them_as_text():
    plan = OutputPlan(tool_mode="auto", tools=[TOOL["function"]], fmt=HERMES)
    text = _render(PLAIN, _request(TURNS, [TOOL]), plan)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in system
    assert render_calls(HERMES, [{"name": "get_weather", "arguments": {"city": "Paris"}}]) in text
    assert '<|im_start|>tool\n<tool_response>\n{"sky": "sunny"}\n</tool_response>' in text
    # no tools in the request: nothing is added
    assert "# Tools" not in _render(PLAIN, _request(TURNS[:1]), OutputPlan())


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_rendered_calls_parse_back(fmt):
    f = FORMATS[fmt]
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1}}]
    _, parsed = f.parse(render_calls(f, calls))
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [(c["name"], c["arguments"]) for c in calls]


def test_template_source_selection_is_not_needed_for_plain_requests():
    plan = OutputPlan()
    assert not plan.parses_tools and plan.make_filters(None, SimpleNamespace()) == []
