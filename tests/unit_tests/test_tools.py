"""Tool calls and structured output through RoutedLM on the tiny random Llama: forced calls and
response formats always validate (the grammar), free answers are parsed, routing ignores tool JSON."""

from __future__ import annotations

import json

import pytest

from loraretriever.serving.tools import ToolSpec, parse_tool_calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
QUESTION = "Translate to German: what is the weather like in Paris this week?"


@pytest.fixture(scope="module")
def lm(tools_lm):
    return tools_lm


def test_a_required_tool_call_always_validates(lm):
    for seed in range(4):
        result = lm.complete(
            QUESTION, tools=[WEATHER, CLOCK], tool_choice="required", max_new_tokens=160, temperature=1.0, seed=seed
        )
        assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 1, result
        call = result.tool_calls[0]
        assert call["name"] in ("get_weather", "get_time") and call["id"].startswith("call_")
        if call["name"] == "get_weather":
            assert call["args"]["city"] in ("Paris", "Oslo", "Lima") and 1 <= call["args"]["days"] <= 7
        else:
            assert call["args"] == {}


def test_a_named_tool_choice_calls_that_tool(lm):
    result = lm.complete(QUESTION, tools=[WEATHER, CLOCK], tool_choice="get_weather", max_new_tokens=160)
    assert [c["name"] for c in result.tool_calls] == ["get_weather"]


def test_structured_output_validates(lm):
    schema = WEATHER["function"]["parameters"]
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    for seed in range(3):
        value = json.loads(
            lm.complete(QUESTION, response_format=fmt, max_new_tokens=160, temperature=1.0, seed=seed).text
        )
        assert set(value) == {"city", "days"} and value["city"] in ("Paris", "Oslo", "Lima")


def test_routing_follows_the_task_not_the_tool_turns(lm):
    bare = lm.route([QUESTION])[0]
    chat = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        },
        {"role": "tool", "content": '{"forecast": "sunny, 24 C", "wind": "low"}'},
    ]
    result = lm.complete(chat, tools=[WEATHER], max_new_tokens=4)
    assert result.routing.adapters == bare.adapters


def test_free_answers_are_parsed():
    spec = ToolSpec((WEATHER,), "auto")
    parsed = parse_tool_calls(
        'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>', spec
    )
    assert parsed.content == "Sure." and parsed.calls[0]["args"] == {"city": "Oslo", "days": 2}
    broken = parse_tool_calls("<tool_call>{not json</tool_call>", spec)
    assert broken.calls == () and "JSONDecodeError" in broken.invalid[0]["error"]
    unknown = parse_tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', spec)
    assert unknown.calls == () and "rm_rf" in unknown.invalid[0]["error"]
    assert parse_tool_calls("plain text", spec).content == "plain text"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tools": [WEATHER], "tool_choice": "nope"}, "tool_choice='nope'"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "is not a function spec"),
        ({"response_format": {"type": "xml"}}, "'xml'"),
    ],
)
def test_bad_tool_options_fail_their_call(lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.complete(QUESTION, **kwargs)


HERMES_TEMPLATE = (  # a template that renders tools itself, in the form Qwen's and Hermes' do
    "{%- if tools %}<|im_start|>system\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_a_template_that_renders_tools_gets_them_and_others_get_a_system_note(lm, smol_tokenizer):
    import copy

    from loraretriever.serving.routed_lm import RoutedLM

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = HERMES_TEMPLATE
    chat = [{"role": "user", "content": QUESTION}]
    with RoutedLM.from_model(lm.model, tokenizer, max_wait_ms=0) as native:
        result = native.complete(chat, tools=[WEATHER], tool_choice="get_weather", max_new_tokens=160)
        rendered = tokenizer.apply_chat_template(chat, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
        assert "<tools>" in rendered and result.prompt_tokens == len(
            tokenizer(rendered, add_special_tokens=False).input_ids
        )
        assert [c["name"] for c in result.tool_calls] == ["get_weather"]
    plain = lm.complete(chat, tools=[WEATHER], tool_choice="get_weather", max_new_tokens=160)
    described = lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "x"}, *chat], tokenize=False, add_generation_prompt=True
    )
    assert plain.prompt_tokens > len(lm.tokenizer(described, add_special_tokens=False).input_ids) + 40, (
        "SmolLM2's template does not render tools: they are described in a system message"
    )
