"""Every option is declared once and reaches every place a user can set it: engine limits
(EngineConfig) as RoutedLM keywords, load options and ``serve`` flags; default generation settings
(GenerationConfig) and routing options (RouteOptions) as fields of each integration and call
options of RoutedLM; the server's options as ``serve`` flags."""

from __future__ import annotations

import dataclasses

import pytest

from langchain_loraretriever import ChatLoraRetriever, LoraRetrieverLLM
from llamaindex_loraretriever import LoraRetrieverLLM as LlamaIndexLLM
from loraretriever.cli import build_parser
from loraretriever.engine.engine import ENGINE_OPTIONS, EngineConfig
from loraretriever.engine.requests import GenerationConfig
from loraretriever.retrieval.options import ROUTE_OPTIONS, RouteOptions
from loraretriever.server.config import ServerConfig
from loraretriever.serving.calls import CALL_OPTIONS
from loraretriever.serving.fields import DEFAULT_GENERATION_OPTIONS, CallDefaults
from loraretriever.serving.routed_lm import LOAD_OPTIONS, RoutedLM


def serve_flags() -> dict[str, str]:
    """``serve``'s flags by destination, with their help."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a.help or "" for a in subparsers.choices["serve"]._actions}


def test_engine_options_are_routedlm_keywords_load_options_and_serve_flags():
    assert tuple(f.name for f in dataclasses.fields(EngineConfig)) == ENGINE_OPTIONS
    flags = serve_flags()
    for field in dataclasses.fields(EngineConfig):
        assert field.name in LOAD_OPTIONS, field.name
        assert field.metadata["help"] in flags.get(field.name, ""), f"serve has no --{field.name}"


def test_every_engine_option_reaches_the_engine(tiny_lm, smol_tokenizer):
    from loraretriever.pool.lora_pool import LoraPool

    pool = LoraPool(tiny_lm)
    given = {"max_batch_size": 3, "max_batch_tokens": 99, "max_prompt_tokens": 40, "max_new_tokens_limit": 20}
    given |= {"max_load_wait": 0.25, "policy": "static", "prefix_cache_gb": 0.5}
    assert set(given) == set(ENGINE_OPTIONS), "a new engine option needs a value here"
    lm = RoutedLM(tiny_lm, smol_tokenizer, pool, **given)
    try:
        assert dataclasses.asdict(lm.engine.config) == given
    finally:
        lm.close()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_batch'\].*max_batch_size"):
        RoutedLM(tiny_lm, smol_tokenizer, pool, max_batch=4)


@pytest.mark.parametrize("cls", [CallDefaults, LoraRetrieverLLM, ChatLoraRetriever, LlamaIndexLLM])
def test_generation_and_routing_defaults_are_fields_of_every_integration(cls):
    for name in (*DEFAULT_GENERATION_OPTIONS, *ROUTE_OPTIONS):
        assert name in cls.model_fields, f"{cls.__name__} has no field {name}"
        assert name in CALL_OPTIONS, name
    helps = {
        f.name: f.metadata["help"] for f in (*dataclasses.fields(GenerationConfig), *dataclasses.fields(RouteOptions))
    }
    for name in (*DEFAULT_GENERATION_OPTIONS, *ROUTE_OPTIONS):  # the shared base carries the declared help
        assert CallDefaults.model_fields[name].description == helps[name]


def test_server_and_routing_options_are_serve_flags():
    flags = serve_flags()
    for field in dataclasses.fields(ServerConfig):
        assert field.name in flags, f"serve has no --{field.name.replace('_', '-')}"
    for name in ROUTE_OPTIONS:
        assert name in flags, f"serve has no --{name.replace('_', '-')}"
