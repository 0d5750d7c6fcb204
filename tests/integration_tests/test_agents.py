"""Agents end to end on the routed model, with a real tool: LangChain ``create_agent``, LangGraph
``create_react_agent`` and LlamaIndex ``FunctionAgent`` each run a call -> tool -> answer loop, and
every model turn is routed by the user's task, as the bare question is.

The tiny random Llama cannot decide to call a tool by itself, so the first turn forces a call the
way users do (a middleware's ``tool_choice``, a dynamic model, ``initial_tool_choice``); the later
turns are ``auto``. (No ``from __future__ import annotations``: LlamaIndex reads the tool's
annotations as objects.)"""

import asyncio
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_loraretriever import ChatLoraRetriever
from llamaindex_loraretriever import LoraRetrieverLLM

QUESTION = "Translate to German: what is the weather like in Paris this week?"


def forecast(city: Literal["Paris", "Oslo", "Lima"], days: int = Field(ge=1, le=7)) -> str:
    """The forecast for a city over some days."""
    return f"{city}: sunny for {days} days"


get_weather = tool("get_weather")(forecast)


class Forecast(BaseModel):
    """A forecast."""

    city: Literal["Paris", "Oslo", "Lima"]
    sunny: bool


@pytest.fixture(scope="module")
def chat(tools_lm):
    return ChatLoraRetriever(lm=tools_lm, max_new_tokens=96)


@pytest.fixture(scope="module")
def task_adapters(chat):
    """The adapters the bare question routes to."""
    return chat.invoke(QUESTION, max_new_tokens=1).response_metadata["routing"]["adapters"]


def assert_tool_loop(messages, task_adapters):
    kinds = [type(m) for m in messages]
    assert kinds == [HumanMessage, AIMessage, ToolMessage, AIMessage], kinds
    call = messages[1].tool_calls[0]
    assert call["name"] == "get_weather"
    assert messages[2].content == forecast(**call["args"])  # the real tool ran on the model's arguments
    for message in (messages[1], messages[3]):
        assert message.response_metadata["routing"]["adapters"] == task_adapters


def test_create_agent_runs_a_tool_loop(chat, task_adapters):
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def first_turn_calls_a_tool(request, handler):
        called = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request if called else request.override(tool_choice="any"))

    agent = create_agent(chat, tools=[get_weather], middleware=[first_turn_calls_a_tool])
    state = agent.invoke({"messages": [HumanMessage(QUESTION)]})
    assert_tool_loop(state["messages"], task_adapters)


def test_an_agent_loop_answers_the_same_with_the_prefix_cache_and_reuses_the_conversation(chat, tools_lm):
    """Each model turn of an agent re-sends the conversation so far: with the prefix cache (on by
    default) the later turns start from the earlier turns' KV, and every answer is what the same
    model without the cache gives."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    from loraretriever.serving.routed_lm import RoutedLM

    @wrap_model_call
    def first_turn_calls_a_tool(request, handler):
        called = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request if called else request.override(tool_choice="any"))

    def loop(model):
        agent = create_agent(model, tools=[get_weather], middleware=[first_turn_calls_a_tool])
        return agent.invoke({"messages": [HumanMessage(QUESTION)]})["messages"]

    uncached_lm = RoutedLM(
        tools_lm.model, tools_lm.tokenizer, tools_lm.pool, tools_lm.router, max_wait_ms=0, prefix_cache_gb=0
    )
    try:
        expected = loop(ChatLoraRetriever(lm=uncached_lm, max_new_tokens=96))
    finally:
        uncached_lm.close()
    messages = loop(chat)

    def turns(messages):
        return [(type(m), m.content, [(c["name"], c["args"]) for c in getattr(m, "tool_calls", [])]) for m in messages]

    assert turns(messages) == turns(expected)
    # the later turn shares the system prompt and the question (its tool note differs: the first
    # turn was forced to call a tool), so its head comes from the cache
    assert messages[3].usage_metadata["input_token_details"]["cache_read"] > 0
    assert all(m.usage_metadata["input_token_details"]["cache_read"] == 0 for m in expected if isinstance(m, AIMessage))


def test_create_agent_structured_response_validates(chat):
    from langchain.agents import create_agent

    agent = create_agent(chat, tools=[], response_format=Forecast)
    for seed in range(2):
        state = agent.invoke({"messages": [HumanMessage(QUESTION)]}, {"configurable": {"seed": seed}})
        assert isinstance(state["structured_response"], Forecast)


def test_langgraph_create_react_agent_runs_a_tool_loop(chat, task_adapters):
    from langgraph.prebuilt import create_react_agent

    def model(state, runtime):  # LangGraph's dynamic model: force a call until a tool has answered
        called = any(isinstance(m, ToolMessage) for m in state["messages"])
        return chat.bind_tools([get_weather], tool_choice=None if called else "any")

    agent = create_react_agent(model, tools=[get_weather])
    state = asyncio.run(agent.ainvoke({"messages": [HumanMessage(QUESTION)]}))
    assert_tool_loop(state["messages"], task_adapters)


def test_llamaindex_function_agent_runs_a_tool_loop(tools_lm, task_adapters):
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    llm = LoraRetrieverLLM(tools_lm, max_new_tokens=96)
    assert llm.metadata.is_function_calling_model
    weather = FunctionTool.from_defaults(forecast, name="get_weather")
    agent = FunctionAgent(tools=[weather], llm=llm, initial_tool_choice="get_weather")

    async def run():  # the workflow starts on a running loop
        return await agent.run(QUESTION)

    output = asyncio.run(run())
    (called,) = output.tool_calls
    assert called.tool_name == "get_weather"
    assert called.tool_output.content == forecast(**called.tool_kwargs)
    assert output.response.additional_kwargs["routing"]["adapters"] == task_adapters


def test_llamaindex_structured_predict_and_structured_llm_validate(tools_lm):
    from llama_index.core.prompts import PromptTemplate

    llm = LoraRetrieverLLM(tools_lm, max_new_tokens=96)
    prompt = PromptTemplate("Translate to German and give the forecast: {question}")
    for seed in range(2):
        assert isinstance(llm.structured_predict(Forecast, prompt, question=QUESTION, seed=seed), Forecast)
    structured = llm.as_structured_llm(Forecast)
    response = structured.complete(QUESTION)
    assert isinstance(response.raw, Forecast)


def test_a_query_engines_llm_calls_reach_a_routing_log(tools_lm):
    """A query engine's Response cannot carry its LLM calls' routing; LlamaIndex's instrumentation can."""
    from llama_index.core import Document, SummaryIndex

    from llamaindex_loraretriever import RoutingLog

    llm = LoraRetrieverLLM(tools_lm, max_new_tokens=4)
    engine = SummaryIndex.from_documents([Document(text="Paris is sunny all week.")]).as_query_engine(llm=llm)
    with RoutingLog() as log:
        engine.query(QUESTION)
    assert log.routings and all(r["adapters"] for r in log.routings)
    recorded = len(log.routings)
    llm.complete(QUESTION)
    assert len(log.routings) == recorded, "detached on exit"
