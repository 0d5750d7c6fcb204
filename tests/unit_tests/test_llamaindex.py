"""LlamaIndex LLM on a tiny Llama: complete/chat/stream, routing in additional_kwargs, async batching."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from llamaindex_loraretriever import LoraRetrieverLLM
from loraretriever import LoraPool, Routing
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import gather_while_ticking

PROMPTS = [f"Item {i}: describe the colour number {i}." for i in range(16)]


class PinnedRouter:
    """A router at the edge that always answers with both adapters."""

    def route(self, prompts, top_k=None, **kwargs):
        return [Routing(("a", "b"), (0.6, 0.4), mode=kwargs.get("mode", "mixture")) for _ in prompts]


@pytest.fixture(scope="module")
def llm(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    pool = LoraPool(tiny_lm)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    lm = RoutedLM(tiny_lm, smol_tokenizer, pool, PinnedRouter(), max_wait_ms=200)
    yield LoraRetrieverLLM(lm, max_new_tokens=5)
    lm.close()


def test_metadata_comes_from_the_model(llm):
    assert llm.metadata.context_window == 64
    assert llm.metadata.num_output == 5 and llm.metadata.is_chat_model


def test_complete_carries_the_routing_and_uses_the_chat_template(llm):
    response = llm.complete(PROMPTS[0])
    assert response.additional_kwargs["routing"]["adapters"] == ["a", "b"]
    assert response.additional_kwargs["completion_tokens"] == 5
    assert response.text == llm.lm.generate([PROMPTS[0]], max_new_tokens=5, chat_template=True)[0].text
    raw = llm.complete(PROMPTS[0], chat_template=False)
    assert raw.additional_kwargs["prompt_tokens"] < response.additional_kwargs["prompt_tokens"]


def test_stream_complete_has_cumulative_text_and_deltas(llm):
    responses = list(llm.stream_complete(PROMPTS[1]))
    final = llm.complete(PROMPTS[1]).text
    assert responses[-1].text == final
    assert "".join(r.delta for r in responses) == final
    for earlier, later in itertools.pairwise(responses):
        assert later.text == earlier.text + later.delta


def test_chat_uses_the_template_and_routes(llm):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content=PROMPTS[2]),
    ]
    response = llm.chat(messages)
    expected = llm.lm.generate(
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]], max_new_tokens=5
    )
    assert response.message.content == expected[0].text
    assert response.additional_kwargs["routing"]["weights"] == [0.6, 0.4]
    streamed = list(llm.stream_chat(messages))
    assert streamed[-1].message.content == response.message.content
    with pytest.raises(ValueError, match="'function' message is not supported"):
        llm.chat([ChatMessage(role=MessageRole.FUNCTION, content="3")])


def test_a_tool_turn_is_read_back_as_the_model_wrote_it(llm):
    from llama_index.core.base.llms.types import TextBlock, ToolCallBlock

    call = ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 1})
    messages = [
        ChatMessage(role=MessageRole.USER, content="Add 1."),
        ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=""), call]),
        ChatMessage(role=MessageRole.TOOL, content="2", additional_kwargs={"tool_call_id": "c1"}),
    ]
    expected = llm.lm.generate(
        [
            [
                {"role": "user", "content": "Add 1."},
                {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'},
                {"role": "tool", "content": "2"},
            ]
        ],
        max_new_tokens=5,
    )
    assert llm.chat(messages).message.content == expected[0].text


def test_concurrent_acomplete_calls_are_batched_and_do_not_block(llm):
    expected = [r.text for r in llm.lm.generate(PROMPTS, max_new_tokens=5, chat_template=True)]
    before = llm.lm.generations

    responses, ticks = asyncio.run(gather_while_ticking([llm.acomplete(p) for p in PROMPTS]))
    assert [r.text for r in responses] == expected
    assert llm.lm.generations - before < len(PROMPTS)
    assert ticks > 0


def test_async_streams_and_achat(llm):
    async def main():
        chunks = [r async for r in await llm.astream_complete(PROMPTS[3])]
        chat = await llm.achat([ChatMessage(role=MessageRole.USER, content=PROMPTS[3])])
        chat_chunks = [
            r async for r in await llm.astream_chat([ChatMessage(role=MessageRole.USER, content=PROMPTS[3])])
        ]
        return chunks, chat, chat_chunks

    chunks, chat, chat_chunks = asyncio.run(main())
    assert chunks[-1].text == llm.complete(PROMPTS[3]).text
    assert chat.message.content == chat_chunks[-1].message.content == chunks[-1].text


def test_bad_input_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.complete("")
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['beams'\]"):
        llm.complete(PROMPTS[0], beams=2)


def test_constructor_refuses_unknown_arguments_and_takes_max_tokens(llm):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_new_token\n"):
        LoraRetrieverLLM(llm.lm, max_new_token=3)
    assert LoraRetrieverLLM(llm.lm, max_tokens=3).max_new_tokens == 3


def test_streams_end_on_a_delta_with_the_routing(llm):
    responses = list(llm.stream_complete(PROMPTS[4]))
    assert all(r.delta for r in responses), [r.delta for r in responses]
    assert responses[-1].additional_kwargs["routing"]["adapters"] == ["a", "b"]
    chats = list(llm.stream_chat([ChatMessage(role=MessageRole.USER, content=PROMPTS[4])]))
    assert all(r.delta for r in chats) and chats[-1].additional_kwargs["routing"]["adapters"] == ["a", "b"]
