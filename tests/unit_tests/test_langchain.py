"""LangChain LLM and chat model on a tiny Llama: one generation per batch, routing info, errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_loraretriever import ChatLoraRetriever, LoraRetrieverLLM
from loraretriever import LoraPool, Routing
from loraretriever.serving.routed_lm import RoutedLM

PROMPTS = [f"Task {i}: rewrite the number {i} in words." for i in range(16)]


class KeywordRouter:
    """A router at the edge: 'odd' prompts get two adapters, the others one."""

    def route(self, prompts, top_k=None, **kwargs):
        mode = kwargs.get("mode", "mixture")
        return [
            Routing(("a", "b"), (0.5, 0.5), similarities=(0.9, 0.8), mode=mode)
            if int(p.split()[1].rstrip(":")) % 2
            else Routing(("b",), (1.0,), similarities=(0.7,), mode=mode)
            for p in prompts
        ]


@pytest.fixture(scope="module")
def lm(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    pool = LoraPool(tiny_lm)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    lm = RoutedLM(tiny_lm, smol_tokenizer, pool, KeywordRouter(), max_wait_ms=200)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def llm(lm):
    return LoraRetrieverLLM(lm=lm, max_new_tokens=5)


@pytest.fixture(scope="module")
def chat(lm):
    return ChatLoraRetriever(lm=lm, max_new_tokens=5)


def test_batch_is_one_generation_and_rows_equal_invoke(llm, lm):
    before = lm.generations
    outputs = llm.batch(PROMPTS)
    assert lm.generations == before + 1
    assert outputs == [llm.invoke(p) for p in PROMPTS]
    assert len(set(outputs)) > 1


def test_generation_info_carries_the_routing(llm):
    result = llm.generate(PROMPTS[:2])
    info = [g[0].generation_info for g in result.generations]
    assert info[0]["routing"]["adapters"] == ["b"] and info[1]["routing"]["adapters"] == ["a", "b"]
    assert info[1]["routing"]["similarities"] == [0.9, 0.8]
    assert info[1]["routing_str"] == "mixture: a 0.50 (sim 0.900), b 0.50 (sim 0.800)"
    assert info[0]["finish_reason"] == "length" and info[0]["completion_tokens"] == 5
    assert result.llm_output["token_usage"]["completion_tokens"] == 10


def test_per_call_routing_through_kwargs_and_bind(llm):
    pinned = llm.bind(adapters=["a"], mode="single")
    text = pinned.invoke(PROMPTS[0])
    assert text == llm.invoke(PROMPTS[0], adapters=["a"], mode="single")
    result = llm.generate([PROMPTS[0]], adapters=["a"])
    assert result.generations[0][0].generation_info["routing"]["adapters"] == ["a"]
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['topk'\]"):
        llm.invoke(PROMPTS[0], topk=2)
    with pytest.raises(KeyError, match="no adapter named 'ghost'"):
        llm.invoke(PROMPTS[0], adapters=["ghost"])


def test_return_exceptions_keeps_the_other_rows(llm):
    outputs = llm.batch([PROMPTS[0], "", PROMPTS[1]], return_exceptions=True)
    assert isinstance(outputs[1], ValueError) and "is empty" in str(outputs[1])
    assert outputs[0] == llm.invoke(PROMPTS[0]) and outputs[2] == llm.invoke(PROMPTS[1])
    with pytest.raises(ValueError, match="is empty"):
        llm.batch([PROMPTS[0], ""])
    async_outputs = asyncio.run(llm.abatch([PROMPTS[0], " "], return_exceptions=True))
    assert async_outputs[0] == outputs[0] and isinstance(async_outputs[1], ValueError)


def test_stop_is_honoured(llm):
    full = llm.invoke(PROMPTS[3])
    stop = full[2:4]
    assert llm.invoke(PROMPTS[3], stop=[stop]) == full[: full.index(stop)]


def test_stream_yields_chunks_and_calls_on_llm_new_token(llm):
    tokens: list[str] = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs) -> None:
            tokens.append(token)

    chunks = list(llm.stream(PROMPTS[5], config={"callbacks": [Collect()]}))
    assert "".join(chunks) == llm.invoke(PROMPTS[5])
    assert len([c for c in chunks if c]) > 1
    assert "".join(tokens) == "".join(chunks)

    async def astream():
        return [c async for c in llm.astream(PROMPTS[5])]

    assert "".join(asyncio.run(astream())) == "".join(chunks)


def test_concurrent_invokes_and_ainvokes_are_coalesced(llm, lm):
    expected = llm.batch(PROMPTS)
    before = lm.generations
    answers: dict[int, str] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def call(i: int) -> None:
        barrier.wait()
        answers[i] = llm.invoke(PROMPTS[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers[i] for i in range(len(PROMPTS))] == expected
    assert lm.generations - before < len(PROMPTS)

    before = lm.generations

    async def many():
        return await asyncio.gather(*(llm.ainvoke(p) for p in PROMPTS))

    assert asyncio.run(many()) == expected
    assert lm.generations - before < len(PROMPTS)


def test_identifying_params_track_the_pool_so_the_cache_never_mixes_pools(llm, lm, tiny_lm):
    from langchain_core.caches import InMemoryCache

    from tests.conftest import save_peft_adapter

    params = llm._identifying_params
    assert params["pool"] == lm.pool.fingerprint() and params["max_new_tokens"] == 5
    assert "lm" not in params
    cached = LoraRetrieverLLM(lm=lm, max_new_tokens=5, cache=InMemoryCache())
    first = cached.invoke(PROMPTS[0])
    before = lm.generations
    assert cached.invoke(PROMPTS[0]) == first and lm.generations == before, "served from the cache"
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        lm.pool.add(save_peft_adapter(tiny_lm, Path(scratch) / "late", r=2, seed=5))
    try:
        assert cached._identifying_params["pool"] != params["pool"]
        cached.invoke(PROMPTS[0])
        assert lm.generations == before + 1, "a changed pool is a cache miss"
    finally:
        lm.pool.remove("late")


def test_token_ids_come_from_the_base_tokenizer(llm, smol_tokenizer):
    assert llm.get_token_ids("hello world") == smol_tokenizer.encode("hello world", add_special_tokens=False)
    assert llm.get_num_tokens("hello world") == 2


def test_chat_batch_is_one_generation_with_routing_metadata(chat, lm):
    conversations = [[SystemMessage("Be brief."), HumanMessage(p)] for p in PROMPTS[:4]]
    before = lm.generations
    messages = chat.batch(conversations)
    assert lm.generations == before + 1
    assert [m.content for m in messages] == [chat.invoke(c).content for c in conversations]
    assert messages[1].response_metadata["routing"]["adapters"] == ["a", "b"]
    assert messages[0].usage_metadata["output_tokens"] == 5
    expected = lm.generate(
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]], max_new_tokens=5
    )
    assert messages[2].content == expected[0].text


def test_chat_multi_turn_routes_on_the_last_user_message(chat):
    history = [HumanMessage(PROMPTS[1]), AIMessage("one"), HumanMessage(PROMPTS[2])]
    assert chat.invoke(history).response_metadata["routing"]["adapters"] == ["b"]


def test_chat_stream_and_errors(chat):
    chunks = list(chat.stream([HumanMessage(PROMPTS[3])]))
    assert "".join(c.content for c in chunks) == chat.invoke([HumanMessage(PROMPTS[3])]).content
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] == 5
    after_tool = chat.invoke([HumanMessage(PROMPTS[0]), ToolMessage("3", tool_call_id="x")])  # read back
    assert isinstance(after_tool.content, str) and after_tool.response_metadata["routing"]["adapters"]
    with pytest.raises(ValueError, match="content block of type 'image_url' is not supported"):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    outputs = chat.batch([[HumanMessage(PROMPTS[0])], [HumanMessage("  ")]], return_exceptions=True)
    assert isinstance(outputs[1], ValueError) and outputs[0].content == chat.invoke([HumanMessage(PROMPTS[0])]).content


# -- the contract a LangChain user relies on -------------------------------------------------
@pytest.mark.parametrize("cls", [LoraRetrieverLLM, ChatLoraRetriever])
def test_unknown_constructor_arguments_are_errors_and_max_tokens_is_an_alias(cls, lm):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_new_token\n"):
        cls(lm=lm, max_new_token=3)  # a typo is not silently dropped
    model = cls(lm=lm, max_tokens=3)
    assert model.max_new_tokens == 3
    message = model.invoke(PROMPTS[0], max_tokens=2)
    text = message if isinstance(message, str) else message.content
    assert len(lm.tokenizer.encode(text, add_special_tokens=False)) <= 2
    with pytest.raises(TypeError, match="not both"):
        model.invoke(PROMPTS[0], max_tokens=2, max_new_tokens=3)


def test_model_name_is_the_model_id_not_a_path(tiny_lm, smol_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_lm.save_pretrained(tmp_path / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    lm = RoutedLM.from_model(model, smol_tokenizer, max_wait_ms=0)
    try:
        chat = ChatLoraRetriever(lm=lm, max_new_tokens=2)
        assert chat.model_name == "tiny-llama" and LoraRetrieverLLM(lm=lm).model_name == "tiny-llama"
        assert chat.invoke("hi").response_metadata["model_name"] == "tiny-llama"
    finally:
        lm.close()


def test_streams_end_on_a_chunk_with_text_and_the_routing(llm, chat):
    chunks = list(llm.stream(PROMPTS[5]))
    assert chunks and all(chunks), f"an empty chunk in {chunks!r}"
    messages = list(chat.stream([HumanMessage(PROMPTS[5])]))
    assert all(m.content for m in messages), [m.content for m in messages]
    assert messages[-1].chunk_position == "last" and messages[-1].response_metadata["routing"]["adapters"] == ["a", "b"]
    assert all("routing" not in m.response_metadata for m in messages[:-1])

    async def astream():
        return [c async for c in chat.astream([HumanMessage(PROMPTS[5])])]

    assert [m.content for m in asyncio.run(astream())] == [m.content for m in messages]


def test_the_cache_key_holds_the_calls_routing(lm):
    from langchain_core.caches import InMemoryCache

    cached = LoraRetrieverLLM(lm=lm, max_new_tokens=5, cache=InMemoryCache())
    routed = cached.generate([PROMPTS[1]]).generations[0][0].generation_info["routing"]["adapters"]
    pinned = cached.bind(adapters=["a"])
    before = lm.generations
    result = pinned.invoke(PROMPTS[1])
    assert lm.generations == before + 1, "a pinned call is not the routed call's cache entry"
    assert routed == ["a", "b"] and result == lm.generate([PROMPTS[1]], max_new_tokens=5, adapters=["a"])[0].text
    assert pinned.invoke(PROMPTS[1]) == result and lm.generations == before + 2, "and has its own entry"


def test_chat_batch_generates_only_what_the_cache_misses(lm):
    from langchain_core.caches import InMemoryCache

    chat = ChatLoraRetriever(lm=lm, max_new_tokens=5, cache=InMemoryCache())
    conversations = [[HumanMessage(p)] for p in PROMPTS[6:10]]
    first = chat.invoke(conversations[0])
    before = lm.generations
    messages = chat.batch(conversations)
    assert lm.generations == before + 1 and messages[0].content == first.content
    assert [m.response_metadata["batch_size"] for m in messages[1:]] == [3, 3, 3], "the cached row is not generated"


@pytest.mark.parametrize("cls", [LoraRetrieverLLM, ChatLoraRetriever])
def test_max_concurrency_caps_the_rows_generated_at_once(cls, lm):
    model = cls(lm=lm, max_new_tokens=5)
    seen: list[int] = []

    class Sizes(BaseCallbackHandler):
        def on_llm_end(self, response, **kwargs) -> None:
            seen.extend(g[0].generation_info["batch_size"] for g in response.generations)

    before = lm.generations
    model.batch(PROMPTS[:6], config={"max_concurrency": 2, "callbacks": [Sizes()]})
    assert lm.generations == before + 3 and max(seen) == 2 and len(seen) == 6


def test_routing_reaches_callbacks_through_a_chain(llm):
    from langchain_core.prompts import PromptTemplate

    routings = []

    class Routings(BaseCallbackHandler):
        def on_llm_end(self, response, **kwargs) -> None:
            routings.append(response.generations[0][0].generation_info["routing"]["adapters"])

    chain = PromptTemplate.from_template("Task {n}: rewrite the number {n} in words.") | llm
    chain.invoke({"n": 3}, config={"callbacks": [Routings()]})
    assert routings == [["a", "b"]]
