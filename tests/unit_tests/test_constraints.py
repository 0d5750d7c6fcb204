"""Grammar-constrained decoding in the engine, on the tiny random Llama (which left alone never
writes JSON): every constrained row validates, its batch-mates are untouched."""

from __future__ import annotations

import json

import pytest

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.constraints import json_rule, json_schema_grammar, lark_grammar
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import GenerationConfig, RequestError

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    pool = LoraPool(tiny_lm)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    composer = Composer(tiny_lm, pool)
    yield Engine(tiny_lm, smol_tokenizer, composer, EngineConfig())
    composer.remove_hooks()


def run(engine, prompt, config, routing=None):
    request = engine.new_request(prompt, config, routing or Routing.pinned(["a"]))
    engine.run([request])
    return request


def test_constrained_rows_always_validate_and_leave_their_batch_mates_alone(engine):
    free = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    alone = run(engine, "Say anything:", free).done.text
    assert not alone.lstrip().startswith("{")  # the random model does not write JSON by itself
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(5):
        constrained = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=seed, grammar=grammar)
        requests = [
            engine.new_request("Is the sky blue? Answer in JSON.", constrained, Routing.pinned(["a", "b"])),
            engine.new_request("Say anything:", free, Routing.pinned(["a"])),
        ]
        engine.run(requests)
        value = json.loads(requests[0].done.text)
        assert value["answer"] in ("yes", "no") and 0 <= value["score"] <= 9 and set(value) == {"answer", "score"}
        assert requests[0].done.finish_reason == "stop"
        assert requests[1].done.text == alone


def test_lark_grammars_embed_json(engine):
    tool = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
    grammar = lark_grammar(f'start: "<tool_call>" call "</tool_call>"\ncall: {json_rule(tool)}')
    text = run(engine, "Weather?", GenerationConfig(max_new_tokens=30, grammar=grammar)).done.text
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    assert json.loads(text[len("<tool_call>") : -len("</tool_call>")])["city"] in ("Paris", "Oslo")


def test_a_bad_grammar_is_the_requests_own_error(engine):
    with pytest.raises(RequestError, match="grammar does not compile"):
        engine.new_request("x", GenerationConfig(max_new_tokens=4, grammar="start: @@@"))
    with pytest.raises(ValueError, match="grammar is a dict"):
        GenerationConfig(grammar=SCHEMA)
