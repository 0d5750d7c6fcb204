"""ChatLoraRetriever's tool calling and structured output, with real LangChain tools, on the tiny
random Llama: forced calls and structured outputs validate on every try; a manual tool loop runs."""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_loraretriever import ChatLoraRetriever

QUESTION = "Translate to German: what is the weather like in Paris this week?"


@tool
def get_weather(city: Literal["Paris", "Oslo", "Lima"], days: int = Field(ge=1, le=7)) -> str:
    """The forecast for a city."""
    return f"{city}: sunny for {days} days"


class Forecast(BaseModel):
    """A forecast."""

    city: Literal["Paris", "Oslo", "Lima"]
    sunny: bool


@pytest.fixture(scope="module")
def chat(tools_lm):
    return ChatLoraRetriever(lm=tools_lm, max_new_tokens=160, temperature=1.0)


def test_a_forced_tool_call_validates_on_every_try(chat):
    llm = chat.bind_tools([get_weather], tool_choice="any")
    for seed in range(4):
        message = llm.invoke(QUESTION, seed=seed)
        assert len(message.tool_calls) == 1 and message.invalid_tool_calls == []
        call = message.tool_calls[0]
        assert call["name"] == "get_weather"
        get_weather.args_schema.model_validate(call["args"])  # raises if the arguments do not validate
        assert message.response_metadata["routing"]["adapters"]


def test_a_tool_loop_runs_a_real_tool_and_routes_by_the_task(chat):
    llm = chat.bind_tools([get_weather], tool_choice="get_weather")
    history = [HumanMessage(QUESTION)]
    call_message = llm.invoke(history, seed=1)
    call = call_message.tool_calls[0]
    output = get_weather.invoke(call["args"])
    history += [call_message, ToolMessage(output, tool_call_id=call["id"])]
    answer = chat.bind_tools([get_weather]).invoke(history, max_new_tokens=8)  # auto: text or a call
    assert answer.response_metadata["routing"]["adapters"] == call_message.response_metadata["routing"]["adapters"]
    streamed = list(llm.stream(history[:1], seed=1))
    assert streamed[-1].tool_call_chunks and streamed[-1].tool_call_chunks[0]["name"] == "get_weather"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_validates_on_every_try(chat, method):
    structured = chat.with_structured_output(Forecast, method=method)
    for seed in range(3):
        value = structured.invoke(QUESTION, seed=seed)
        assert isinstance(value, Forecast)


def test_structured_output_with_raw_and_json_mode(chat):
    raw = chat.with_structured_output(Forecast, include_raw=True).invoke(QUESTION, seed=0)
    assert isinstance(raw["parsed"], Forecast) and raw["parsing_error"] is None and raw["raw"].content
    schema = Forecast.model_json_schema()
    as_dict = chat.with_structured_output(schema).invoke(QUESTION, seed=0)
    assert set(as_dict) == {"city", "sunny"}
