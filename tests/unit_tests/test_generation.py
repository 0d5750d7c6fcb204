"""Generator on a tiny Llama with SmolLM2's real tokenizer: batching, stop strings, streaming, sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.generation import Generator
from loraretriever.engine.requests import GenerationConfig

PROMPTS = ["Translate to French: the cat sleeps.", "Is this review positive? A fine film.", "Name a colour:"]


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm


@pytest.fixture(scope="module")
def generator(tiny_lm, smol_tokenizer, tiny_lm_adapters) -> Generator:
    pool = LoraPool(tiny_lm)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    composer = Composer(tiny_lm, pool)
    yield Generator(tiny_lm, smol_tokenizer, composer)
    composer.remove_hooks()


ROUTINGS = [Routing.pinned(["a"]), Routing(("b", "a"), (0.6, 0.4), mode="fusion"), Routing.base()]


def test_batch_rows_equal_each_row_alone(generator):
    configs = [GenerationConfig(max_new_tokens=n) for n in (6, 12, 9)]
    batch = generator.generate(PROMPTS, ROUTINGS, configs)
    for i, prompt in enumerate(PROMPTS):
        alone = generator.generate([prompt], [ROUTINGS[i]], configs[i])[0]
        assert batch[i].text == alone.text
        assert batch[i].completion_tokens == alone.completion_tokens == configs[i].max_new_tokens
        assert batch[i].finish_reason == "length"
        assert batch[i].routing == ROUTINGS[i]
    assert len({c.text for c in batch}) == 3


def test_gated_rows_generate_alongside_others_and_leave_the_batch_early(generator, model):
    from loraretriever.engine.gates import FlowGate, FlowGateConfig, MeteoraGate, MeteoraGateConfig

    composer, pool = generator.composer, generator.composer.pool
    flow = FlowGate(
        FlowGateConfig(k=2, hidden_size=model.config.hidden_size, num_layers=model.config.num_hidden_layers)
    )
    modules = {m: model.get_submodule(m).in_features for n in pool.names for m in pool.get(n).modules}
    moe = MeteoraGate(
        MeteoraGateConfig(tuple(pool.names), {n: pool.get(n).digest for n in pool.names}, modules, top_k=1)
    )
    with torch.no_grad():
        torch.nn.init.normal_(flow.weight, generator=torch.Generator().manual_seed(1))
        for weight in moe.weights.values():
            torch.nn.init.normal_(weight, generator=torch.Generator().manual_seed(2))
    composer.gates.register("flow", flow)
    composer.gates.register("moe", moe)
    try:
        routings = [Routing(("b", "a"), (0.5, 0.5), mode="flow", gate="flow"), Routing.meteora("moe"), Routing.base()]
        configs = [GenerationConfig(max_new_tokens=n) for n in (4, 12, 8)]  # rows finish at different steps
        batch = generator.generate(PROMPTS, routings, configs)
        for i, prompt in enumerate(PROMPTS):
            alone = generator.generate([prompt], [routings[i]], configs[i])[0]
            assert batch[i].text == alone.text, routings[i]
        # Each gate changes its own prompt's output: flow vs the plain mixture of its slots, meteora vs base.
        mixture = generator.generate(PROMPTS[:1], [Routing.pinned(["b", "a"])], configs[0])[0]
        assert batch[0].text != mixture.text, "the flow gate's per-token weights changed nothing"
        base = generator.generate(PROMPTS[1:2], [Routing.base()], configs[1])[0]
        assert batch[1].text != base.text, "the meteora gate's adapters changed nothing"
    finally:
        composer.gates.unregister("flow")
        composer.gates.unregister("moe")


def test_base_rows_match_transformers_generate(generator, model, tokenizer):
    """40 tokens: the incremental detokenisation must match decoding all ids at once."""
    ours = generator.generate(PROMPTS, config=GenerationConfig(max_new_tokens=40))
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for i, completion in enumerate(ours):
        expected = tokenizer.decode(reference[i, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert completion.text == expected
        assert completion.prompt_tokens == int(inputs["attention_mask"][i].sum())


def test_repetition_penalty_matches_transformers_generate(generator, model, tokenizer):
    """Each row alone (transformers pads a batch, which the penalty would see). The random model never
    repeats by itself, so the test uses a penalty below 1, which rewards repeats and changes the text."""
    for prompt in PROMPTS[:2]:
        (ours,) = generator.generate([prompt], config=GenerationConfig(max_new_tokens=24, repetition_penalty=0.5))
        inputs = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            reference = model.generate(
                **inputs,
                max_new_tokens=24,
                do_sample=False,
                repetition_penalty=0.5,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert ours.text == tokenizer.decode(reference[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        (plain,) = generator.generate([prompt], config=GenerationConfig(max_new_tokens=24))
        assert plain.text != ours.text


def test_stop_string_spanning_a_token_boundary(generator, tokenizer):
    full = generator.generate(PROMPTS[:1], ROUTINGS[:1], GenerationConfig(max_new_tokens=12))[0]
    pieces = [tokenizer.decode([t]) for t in tokenizer(full.text, add_special_tokens=False)["input_ids"]]
    boundaries = [sum(len(p) for p in pieces[:n]) for n in range(1, len(pieces))]
    # A 4-character stop string made of the last 2 characters of one token and the first 2 of the next,
    # occurring nowhere earlier in the text.
    boundary = next(b for b in boundaries if b >= 2 and full.text.find(full.text[b - 2 : b + 2]) == b - 2)
    stop = full.text[boundary - 2 : boundary + 2]
    stopped = generator.generate(PROMPTS[:1], ROUTINGS[:1], GenerationConfig(max_new_tokens=12, stop=(stop,)))[0]
    assert stopped.text == full.text[: boundary - 2]
    assert stopped.finish_reason == "stop" and stopped.stop_sequence == stop
    assert stopped.completion_tokens < full.completion_tokens


def test_streaming_deltas_add_up_to_the_text(generator, tokenizer):
    full = generator.generate(PROMPTS, ROUTINGS, GenerationConfig(max_new_tokens=10))
    stops = [full[0].text[8:11], "\u2603 never", full[2].text[-3:]]
    configs = [GenerationConfig(max_new_tokens=10, stop=(s,)) for s in stops]
    events = list(generator.stream(PROMPTS, ROUTINGS, configs))
    expected = generator.generate(PROMPTS, ROUTINGS, configs)
    for row in range(3):
        row_events = [e for e in events if e.row == row]
        assert "".join(e.delta for e in row_events) == expected[row].text
        assert row_events[-1].completion == expected[row]
        assert all(e.completion is None for e in row_events[:-1])
        assert not any(stops[row] in e.delta for e in row_events)
    assert len([e for e in events if e.row == 1]) > 3, "tokens are streamed as they are produced"
    assert [e.row for e in events[:3]] == [0, 1, 2], "rows stream side by side"


def test_sampling_is_seeded_per_row(generator):
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    greedy = GenerationConfig(max_new_tokens=8)
    batch = generator.generate(PROMPTS, ROUTINGS, [sampled, greedy, sampled])
    alone = generator.generate(PROMPTS[2:], ROUTINGS[2:], sampled)[0]
    assert batch[2].text == alone.text == generator.generate(PROMPTS[2:], ROUTINGS[2:], sampled)[0].text
    assert batch[1].text == generator.generate(PROMPTS[1:2], ROUTINGS[1:2], greedy)[0].text
    greedy_alone = generator.generate(PROMPTS[2:], ROUTINGS[2:], greedy)[0]
    other_seed = generator.generate(
        PROMPTS[2:], ROUTINGS[2:], GenerationConfig(max_new_tokens=8, temperature=1.0, seed=8)
    )
    assert alone.text != greedy_alone.text, "temperature 1.0 sampled the greedy text"
    assert alone.text != other_seed[0].text, "seeds 7 and 8 sampled the same text"


def test_chat_template_on_request(generator, tokenizer):
    raw = generator.generate(PROMPTS[:1], config=GenerationConfig(max_new_tokens=2))[0]
    chat = generator.generate(
        PROMPTS[:1], config=GenerationConfig(max_new_tokens=2, chat_template=True, system_prompt="Be brief.")
    )[0]
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"]) > raw.prompt_tokens


def test_long_prompt_truncated_left_with_warning_or_refused(generator):
    long_prompt = "one two three four five six seven eight nine ten " * 10  # > 64-token window
    with pytest.warns(UserWarning, match="oldest tokens were dropped"):
        completion = generator.generate([long_prompt], config=GenerationConfig(max_new_tokens=4))[0]
    assert completion.truncated_prompt and completion.prompt_tokens == 60
    with pytest.raises(ValueError, match="context window.*truncation='left'"):
        generator.generate([long_prompt], config=GenerationConfig(max_new_tokens=4, truncation="error"))
    with pytest.raises(ValueError, match="max_new_tokens=64 is over the limit of 63"):
        generator.generate(["hi"], config=GenerationConfig(max_new_tokens=64))


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_a_clear_error(generator, prompt):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generator.generate(["fine", prompt])


def test_bad_settings_are_clear_errors(generator):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="repetition_penalty=0"):
        GenerationConfig(repetition_penalty=0)
    with pytest.raises(ValueError, match="top_p=0"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="stop=.*non-empty"):
        GenerationConfig(stop=("",))
    with pytest.raises(TypeError, match="not one string"):
        generator.generate("a single string")
    with pytest.raises(ValueError, match="2 prompts, 1 routings"):
        generator.generate(["a", "b"], [Routing.base()])


def test_incremental_detokenisation_waits_for_whole_characters(tokenizer):
    from loraretriever.engine.outputs import _new_text
    from loraretriever.engine.requests import RequestState

    text = "naïve café 世界 🙂 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces), "the sample must split a character across tokens"
    row = RequestState([1], GenerationConfig(), Routing.base())
    shown = []
    for token in ids:
        row.ids.append(token)
        row.detokenized += 1
        row.text += _new_text(tokenizer, row)
        shown.append(row.text)
    assert row.text == text
    assert not any("\ufffd" in partial for partial in shown)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(shown))
