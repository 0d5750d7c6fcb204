"""Property-based fuzzing (hypothesis): request options and prompts (Unicode, lone surrogates,
control characters, huge), card JSON and adapter configs. Every input gets a clear error (a
ValueError or TypeError that loraretriever raised itself, with a message) or a correct answer; the
worker never dies and the pool never changes. Writes its counts to the reliability summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from loraretriever.errors import LoraRetrieverError
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.cards import AdapterCard
from loraretriever.serving.routed_lm import Result
from tests.conftest import save_peft_adapter
from tests.reliability import record_summary

pytestmark = pytest.mark.slow

TRIED: Counter = Counter()
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLEAR = LoraRetrieverError  # the library's own errors, typed by meaning; anything else is a bug
PACKAGE = Path(__import__("loraretriever").__file__).parent


def assert_clear(error: LoraRetrieverError, names: tuple[str, ...] = ()) -> None:
    """Raised by loraretriever's own checks, not escaped from deep inside torch or transformers
    (a bad value must be caught where it enters), a client's error (4xx), and saying something;
    with ``names`` (what the caller passed), the message names one of them."""
    assert 400 <= error.status < 500, f"{error!r} answers {error.status}: a bad input must be a 4xx"
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    origin = Path(frame.tb_frame.f_code.co_filename) if frame is not None else None
    assert origin is not None and PACKAGE in origin.parents, f"{error!r} escaped from {origin}"
    assert len(str(error)) > 10, f"{error!r} does not say what is wrong"
    if names:
        assert any(name in str(error) for name in names), f"{error!r} names none of {names}"
        assert error.param is None or error.param in names, f"{error!r} blames {error.param!r}, not one of {names}"


texts = st.one_of(
    st.text(max_size=120),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "\x00\x01\x1b[31m", "   ", "", "e\u0301" * 30]),
    st.text(min_size=3000, max_size=4000),
)
numbers = st.one_of(st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3))
options = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.one_of(st.integers(-2, 6), st.just(10**9), st.text(max_size=2)),
        "temperature": numbers,
        "top_p": numbers,
        "repetition_penalty": numbers,
        "seed": st.one_of(st.integers(-5, 2**40), st.text(max_size=3)),
        "stop": st.one_of(st.lists(st.text(max_size=4), max_size=3), st.text(max_size=3)),
        "top_k": numbers,
        "mode": st.sampled_from(["mixture", "fusion", "single", "flow", "bogus", ""]),
        "truncation": st.sampled_from(["left", "error", "middle"]),
        "adapters": st.one_of(st.lists(st.sampled_from(["sentiment", "nli", "ghost", ""]), max_size=3), st.none()),
        "routing_temperature": numbers,
        "min_similarity": numbers,
    },
)


@pytest.fixture(scope="module")
def lm(tools_lm):
    before = tools_lm.pool.fingerprint()
    yield tools_lm
    assert tools_lm.pool.fingerprint() == before, "fuzzing changed the pool"


@FUZZ
@given(prompt=texts, kwargs=options)
def test_requests_get_a_clear_error_or_an_answer(lm, prompt, kwargs):
    kwargs = {"max_new_tokens": 3, **kwargs}
    try:
        (result,) = lm.generate([prompt], **kwargs)
    except CLEAR as error:
        assert_clear(error, names=("prompt", *kwargs))
        TRIED["request: clear error"] += 1
    else:
        assert isinstance(result, Result) and isinstance(result.text, str)
        assert result.completion_tokens <= kwargs["max_new_tokens"]
        TRIED["request: answer"] += 1
    assert lm.complete("Translate to German: good night", max_new_tokens=1).completion_tokens == 1, "the worker serves"


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
cards = st.one_of(
    json_values,
    st.fixed_dictionaries(  # mostly well formed: names and samples as a pool would have them
        {
            "name": st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True),
            "samples": st.lists(texts, min_size=1, max_size=3),
        },
        optional={
            "domain": st.one_of(st.text(max_size=8), st.none()),
            "tags": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
        },
    ),
    st.fixed_dictionaries(
        {
            "name": st.one_of(st.text(max_size=12), json_values),
            "samples": st.one_of(st.lists(texts, max_size=3), json_values),
        },
        optional={"domain": json_values, "tags": json_values, "description": json_values, "extra": json_values},
    ),
)


@settings(max_examples=300, deadline=None)
@given(data=cards)
def test_card_json_is_a_card_or_a_clear_error(data):
    try:
        card = AdapterCard.from_dict(data)
    except CLEAR as error:
        assert_clear(error)
        TRIED["card: clear error"] += 1
    else:
        assert card.samples and all(isinstance(s, str) for s in card.samples)
        TRIED["card: accepted"] += 1


@pytest.fixture(scope="module")
def adapter_files(tools_lm, tmp_path_factory):
    directory = save_peft_adapter(tools_lm.model, tmp_path_factory.mktemp("fuzz") / "a", r=2, seed=1)
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


configs = st.fixed_dictionaries(
    {},
    optional={
        "r": st.one_of(st.integers(-2, 4), st.floats(allow_nan=True), st.text(max_size=2), st.booleans()),
        "lora_alpha": st.one_of(
            st.integers(-4, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2)
        ),
        "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj", ".*"]), st.integers(-1, 4), max_size=2),
        "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", ".*"]), st.floats(allow_nan=True), max_size=2),
        "use_dora": st.booleans(),
        "fan_in_fan_out": st.booleans(),
        "peft_type": st.sampled_from(["LORA", "IA3", "lora", ""]),
        "target_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "nope"]), max_size=2), st.none()),
    },
)


@FUZZ
@given(changes=configs)
def test_adapter_configs_load_or_fail_clearly(tools_lm, adapter_files, changes):
    config, weights = adapter_files
    pool = LoraPool(tools_lm.model)  # a pool of its own: the served one never changes
    try:
        pool.add_state_dict("fuzzed", {**config, **changes}, dict(weights))
    except CLEAR as error:
        assert_clear(error)
        TRIED["adapter config: clear error"] += 1
    else:
        assert "fuzzed" in pool
        TRIED["adapter config: accepted"] += 1


def test_write_the_counts():
    """Runs after the properties above (file order): their counts into the summary. A run of this
    test alone, or after a property failed, has nothing true to record."""
    ran = {kind.split(":")[0] for kind in TRIED}
    assert ran == {"request", "card", "adapter config"}, f"only {sorted(ran)} ran; run the whole file"
    record_summary(
        "fuzz",
        {
            "command": "pytest tests/reliability/test_fuzz.py",
            "inputs_tried": sum(TRIED.values()),
            **dict(sorted(TRIED.items())),
            "other_exceptions": 0,
            "dead_workers": 0,
            "pool_changed": False,
        },
    )
