"""`loraretriever serve` as a real process on a free port, driven by real clients: the `openai` SDK
(sync, async, streaming), LangChain's ChatOpenAI and LlamaIndex's OpenAILike, over a copy of the
demo pool on the default model."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import httpx
import openai
import pytest

from tests.conftest import DEMO_POOL, ServeProcess, copy_pool, save_peft_adapter

KEY = "sk-test"
PROMPTS = [  # test inputs of four BIG-bench tasks of the demo pool
    "I have put away all the laundry. Change tense to PRESENT PERFECT:",
    "Sort the following words alphabetically: List: syndrome therefrom",
    "Q: How many legs does a spider have? A:",
    "Is the following sentence plausible? 'Joao Moutinho caught the screen pass in the NFC championship.'",
]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    return copy_pool(DEMO_POOL, tmp_path_factory.mktemp("served") / "pool")


@pytest.fixture(scope="module")
def server(pool_dir, tmp_path_factory):
    process = ServeProcess(pool_dir, tmp_path_factory.mktemp("logs"), "--max-batch-size", "8", "--max-pending", "12")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def library_router(pool_dir, minilm):
    """The library's own routing over the same cards (in memory: the server owns the pool's index)."""
    from loraretriever.retrieval.cards import CardStore
    from loraretriever.retrieval.router import Router

    router = Router.from_cards(CardStore(pool_dir / "cards").all(), embedder=minilm)
    yield router
    router.close()


def chat(client, prompt, **kwargs):
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)


def test_auto_routes_each_prompt_as_the_library_does(client, library_router):
    expected = library_router.route(PROMPTS)
    for prompt, routing in zip(PROMPTS, expected, strict=True):
        reply = chat(client, prompt, model="auto")
        choice = reply.choices[0]
        assert choice.message.content
        assert choice.routing["adapters"] == list(routing.adapters)
        assert choice.routing["mode"] == "mixture"
        assert choice.routing["similarities"] == pytest.approx(list(routing.similarities), abs=1e-4)
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 10
        assert reply.model == "auto"


def test_models_lists_auto_and_every_adapter(client, pool_dir):
    names = [m.id for m in client.models.list()]
    stored = sorted(p.name for p in (pool_dir / "adapters").iterdir())
    assert names[0] == "auto" and sorted(names[1:]) == stored


def test_an_adapter_as_model_pins_it(client):
    pinned = chat(client, PROMPTS[0], model="word_sorting")
    assert pinned.choices[0].routing["adapters"] == ["word_sorting"]
    same = chat(client, PROMPTS[0], model="auto", extra_body={"routing": {"adapters": ["word_sorting"]}})
    assert same.choices[0].routing["adapters"] == ["word_sorting"]
    assert same.choices[0].message.content == pinned.choices[0].message.content
    other = chat(client, PROMPTS[0], model="auto", extra_body={"routing": {"mode": "single"}})
    assert other.choices[0].routing["mode"] == "single"  # the top-1 applied alone (the others listed)


def test_streaming_gives_the_same_text_with_routing_first_and_usage_last(client):
    whole = chat(client, PROMPTS[1], model="auto", max_tokens=12)
    chunks = list(
        chat(client, PROMPTS[1], model="auto", max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    first = next(c for c in chunks if c.choices)
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].routing["adapters"] == whole.choices[0].routing["adapters"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = {"model": "auto", "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[0]["choices"][0]["routing"]["adapters"]


def test_text_completions_with_n_and_a_list_of_prompts(client):
    reply = client.completions.create(model="tense", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: the two choices agree
    assert reply.choices[0].text != reply.choices[2].text
    assert all(c.routing["adapters"] == ["tense"] for c in reply.choices)
    sampled = client.completions.create(model="auto", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, n=2, seed=3)
    again = client.completions.create(model="auto", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, n=2, seed=3)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # choice i samples with seed + i


def test_stop_and_max_tokens(client):
    story = "Tell me a long story about a dragon who learns to fly."
    reply = chat(client, story, model="auto", max_completion_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    full = chat(client, story, model="auto", max_tokens=16).choices[0].message.content
    stop = full.strip().split()[2]
    cut = chat(client, story, model="auto", max_tokens=16, stop=[stop]).choices[0]
    assert stop not in cut.message.content and cut.finish_reason == "stop"


def test_async_clients_share_the_engine(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as aclient:
            calls = [
                aclient.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": p}], max_tokens=6, temperature=0
                )
                for p in PROMPTS * 2
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    texts = [r.choices[0].message.content for r in replies]
    assert texts[:4] == texts[4:]  # each prompt's answer does not depend on its batch-mates


@pytest.mark.parametrize(
    ("kwargs", "status", "match"),
    [
        ({"model": "no_such_adapter"}, 404, "does not exist"),
        ({"model": "auto", "logprobs": True}, 400, "logprobs"),
        ({"model": "auto", "extra_body": {"routing": {"top_k": 0}}}, 400, "top_k=0"),
        ({"model": "auto", "extra_body": {"routing": {"temperature": 1}}}, 400, "unknown option"),
        ({"model": "auto", "extra_body": {"routing": {"adapters": ["nope"]}}}, 404, "nope"),
        ({"model": "auto", "extra_body": {"surprise": 1}}, 400, "unknown field 'surprise'"),
        ({"model": "auto", "temperature": -1}, 400, "temperature"),
        ({"model": "auto", "n": 13}, 429, "max_pending=12"),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, status, match):
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, PROMPTS[0], **kwargs)
    assert caught.value.status_code == status
    assert match in caught.value.body["message"]
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"


def test_prompt_too_long_is_413_and_a_wrong_key_401(client, server):
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, "word " * 9000, model="auto")
    assert caught.value.status_code == 413 and "lower max_tokens" in caught.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_bad_request_among_good_ones_fails_alone(server, client):
    alone = [chat(client, p, model="auto").choices[0].message.content for p in PROMPTS]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as aclient:

            async def one(prompt, **kwargs):
                messages = [{"role": "user", "content": prompt}]
                return await aclient.chat.completions.create(
                    model="auto", messages=messages, max_tokens=8, temperature=0, **kwargs
                )

            bad = one("word " * 9000)
            return await asyncio.gather(*[one(p) for p in PROMPTS], bad, return_exceptions=True)

    *good, bad = asyncio.run(run())
    assert isinstance(bad, openai.APIStatusError) and bad.status_code == 413
    assert [r.choices[0].message.content for r in good] == alone


def test_langchain_chat_openai(server, client):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="auto", base_url=f"{server.url}/v1", api_key=KEY, temperature=0, max_tokens=8)
    direct = [chat(client, p, model="auto").choices[0].message.content for p in PROMPTS[:3]]
    assert llm.invoke(PROMPTS[0]).content == direct[0]
    assert [m.content for m in llm.batch(PROMPTS[:3])] == direct
    assert "".join(c.content for c in llm.stream(PROMPTS[1])) == direct[1]


def test_llamaindex_openai_like(server, client):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model="auto",
        api_base=f"{server.url}/v1",
        api_key=KEY,
        is_chat_model=True,
        context_window=8192,
        temperature=0,
        max_tokens=8,
    )
    direct = chat(client, PROMPTS[2], model="auto").choices[0].message.content
    assert llm.chat([ChatMessage(role="user", content=PROMPTS[2])]).message.content == direct
    assert llm.complete(PROMPTS[2]).text == direct
    assert asyncio.run(llm.acomplete(PROMPTS[2])).text == direct


def test_pool_admin_adds_and_removes_an_adapter(server, client, tmp_path, smollm):
    model, _ = smollm
    source = save_peft_adapter(model, tmp_path / "haiku", r=2, targets=["q_proj"], seed=7)
    card = {"samples": ["Write a haiku about the autumn moon.", "Compose a haiku on cherry blossoms."]}
    headers = {"Authorization": f"Bearer {KEY}"}
    added = httpx.post(f"{server.url}/v1/adapters", json={"source": str(source), "card": card}, headers=headers)
    assert added.status_code == 201 and added.json()["id"] == "haiku"
    again = httpx.post(f"{server.url}/v1/adapters", json={"source": str(source), "card": card}, headers=headers)
    assert again.status_code == 409
    assert "haiku" in [m.id for m in client.models.list()]
    routed = chat(
        client, "Write a haiku about a quiet winter lake.", model="auto", extra_body={"routing": {"top_k": 1}}
    )
    assert routed.choices[0].routing["adapters"] == ["haiku"]

    assert httpx.delete(f"{server.url}/v1/adapters/haiku", headers=headers).json()["deleted"] is True
    assert "haiku" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        chat(client, "Write a haiku.", model="haiku")
    assert httpx.delete(f"{server.url}/v1/adapters/haiku", headers=headers).status_code == 404


def test_metrics_count_what_was_served(server, client):
    chat(client, PROMPTS[3], model="sports_understanding")
    with urllib.request.urlopen(f"{server.url}/metrics") as response:
        text = response.read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples["loraretriever_time_to_first_token_seconds_count"] >= 1
    assert samples['loraretriever_adapter_requests_total{adapter="sports_understanding"}'] >= 1
    assert samples["loraretriever_generation_tokens_total"] >= 1
    assert "loraretriever_queue_depth" in samples and "loraretriever_running_batch_size" in samples


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_metrics(server, client):
    """Prompt tokens served from the prefix cache, as OpenAI reports them (usage's
    prompt_tokens_details.cached_tokens) and as vLLM counts them (prefix cache queries and hits)."""

    def hits() -> float:
        with urllib.request.urlopen(f"{server.url}/metrics") as response:
            text = response.read().decode()
        samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
        return samples["loraretriever_prefix_cache_hits_total"]

    system = "You are a careful assistant. " + "Answer in one short sentence, citing the rule you used. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[1]}]
    before = hits()
    first = client.chat.completions.create(model="word_sorting", messages=messages, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model="word_sorting", messages=messages, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens > 100
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 64, (cached, first.usage.prompt_tokens)
    assert again.choices[0].message.content == first.choices[0].message.content
    other = client.chat.completions.create(model="tense", messages=messages, max_tokens=4, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another adapter, another KV
    assert hits() - before >= cached


def test_pool_admin_needs_a_configured_key(tmp_path):
    keyless = ServeProcess(copy_pool(DEMO_POOL, tmp_path / "pool"), tmp_path, "--max-batch-size", "2", api_key=None)
    try:
        response = httpx.delete(f"{keyless.url}/v1/adapters/tense")
        assert response.status_code == 403 and "--api-key" in response.json()["error"]["message"]
        assert "tense" in [m["id"] for m in httpx.get(f"{keyless.url}/v1/models").json()["data"]]
    finally:
        keyless.stop()


@pytest.fixture(scope="module")
def router_only(server, tmp_path_factory):
    """`serve --backend`: routes over its own copy of the pool's cards, generates on `server`."""
    root = tmp_path_factory.mktemp("router_only")
    front = ServeProcess(
        copy_pool(DEMO_POOL, root / "pool"), root, "--backend", server.url, "--backend-api-key", KEY, "--top-k", "1"
    )
    yield front
    front.stop()


def test_router_only_forwards_with_the_routed_adapter_as_model(router_only, client, library_router):
    front = openai.OpenAI(base_url=f"{router_only.url}/v1", api_key=KEY, max_retries=0)
    for prompt, expected in zip(PROMPTS, library_router.route(PROMPTS, top_k=1), strict=True):
        reply = chat(front, prompt, model="auto")
        adapter = expected.adapters[0]
        assert reply.choices[0].routing["adapters"] == [adapter] and reply.choices[0].routing["mode"] == "single"
        # the backend served it as that adapter, pinned: the same text as asking the backend for it
        direct = chat(client, prompt, model=adapter)
        assert reply.choices[0].message.content == direct.choices[0].message.content
        assert direct.choices[0].routing["adapters"] == [adapter]
    streamed = list(chat(front, PROMPTS[1], model="auto", stream=True))
    assert streamed[0].choices[0].routing["adapters"] == [library_router.route([PROMPTS[1]], top_k=1)[0].adapters[0]]
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed)
        == chat(front, PROMPTS[1], model="auto").choices[0].message.content
    )


def test_router_only_refuses_what_one_adapter_engines_cannot_do(router_only):
    front = openai.OpenAI(base_url=f"{router_only.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="mode='mixture'"):
        chat(front, PROMPTS[0], model="auto", extra_body={"routing": {"mode": "mixture"}})
    with pytest.raises(openai.NotFoundError):
        chat(front, PROMPTS[0], model="no_such_adapter")
    stored = sorted(p.name for p in (DEMO_POOL / "adapters").iterdir())
    assert [m.id for m in front.models.list()] == ["auto", *stored]


def test_concurrent_streaming_clients_all_complete_and_correctly_routed(server, pool_dir):
    from loraretriever.evaluation.bench_load import run_load_benchmark

    result = run_load_benchmark(pool_dir, url=server.url, api_key=KEY, clients=8, requests=12, max_tokens=4)
    assert result["failed"] == 0, result["errors"]
    assert result["complete"] == result["correctly_routed"] == 12 and result["all_complete_and_routed"]
    assert result["ttft_s"]["p99"] >= result["ttft_s"]["p50"] > 0 and result["tokens_per_s"] > 0


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
        },
    },
}


def test_tool_calls_and_response_formats_through_the_api(client):
    ask = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
    reply = client.chat.completions.create(
        model="auto", messages=ask, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    assert isinstance(arguments["city"], str) and set(arguments) <= {"city", "days"}

    streamed = list(
        client.chat.completions.create(
            model="auto", messages=ask, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60, temperature=0,
            stream=True,
        )
    )  # fmt: skip
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == arguments

    call = choice.message.tool_calls[0]
    follow_up = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"},
    ]
    answer = client.chat.completions.create(model="auto", messages=follow_up, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    assert answer.choices[0].routing["adapters"] == choice.routing["adapters"]  # routed by the user's question

    schema = {
        "type": "object",
        "properties": {"sunny": {"type": "boolean"}},
        "required": ["sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}
    shaped = client.chat.completions.create(
        model="auto", messages=ask, response_format=fmt, max_tokens=30, temperature=0
    )
    assert isinstance(json.loads(shaped.choices[0].message.content)["sunny"], bool)


def test_langchain_openai_tool_calling_against_the_server(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="auto", base_url=f"{server.url}/v1", api_key=KEY, temperature=0, max_tokens=60)
    message = llm.bind_tools([WEATHER_TOOL], tool_choice="any").invoke("Weather in Oslo tomorrow?")
    assert message.tool_calls[0]["name"] == "get_weather" and isinstance(message.tool_calls[0]["args"]["city"], str)
