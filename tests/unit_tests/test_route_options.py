"""RouteOptions: one validated set of routing options; every mode honours an option or refuses it."""

from __future__ import annotations

import argparse

import pytest

from loraretriever import RetrievalError, RouteOptions
from loraretriever.cli.route_flags import add_route_arguments, route_options_from
from loraretriever.engine.requests import GenerationConfig
from loraretriever.serving.calls import split_call_options


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mode": "meteora", "filter": {"customer": "a"}}, r"mode='meteora' .* takes no filter"),
        ({"mode": "meteora", "exclude": ["a"]}, r"takes no exclude"),
        ({"mode": "meteora", "adapters": ["a"]}, r"takes no adapters"),
        ({"adapters": ["a"], "top_k": 2}, r"top_k=2 chooses among retrieved adapters, but adapters=\('a',\) pins"),
        ({"adapters": ["a"], "filter": {"k": "v"}}, r"filter=.* pins them"),
        ({"adapter_weights": [1.0]}, r"needs adapters="),
        ({"adapters": ["a", "b"], "adapter_weights": [1.0]}, r"1 weights for 2 adapters"),
        ({"adapters": ["a", "a"]}, r"names an adapter twice"),
        ({"routing_temperature": 0}, r"routing_temperature=0 must be a positive number"),
        ({"top_k": 0}, r"top_k=0 must be a positive integer"),
        ({"mode": "blend"}, r"mode='blend' is not one of"),
        ({"gate": "g"}, r"gate='g' needs mode='flow' or 'meteora'"),
        ({"min_similarity": 2}, r"min_similarity=2 must lie in \[-1, 1\]"),
        ({"exclude": "a"}, r"exclude='a' must be a list"),
    ],
)
def test_refused_options_name_the_value_and_the_fix(options, match):
    with pytest.raises(RetrievalError, match=match):
        RouteOptions(**options)


def test_options_are_normalised_hashable_and_replace_validates():
    a = RouteOptions(adapters=["x", "y"], adapter_weights=[1, 3], mode="fusion")
    assert a.adapters == ("x", "y") and a.adapter_weights == (1.0, 3.0)
    assert a == RouteOptions(adapters=("x", "y"), adapter_weights=(1.0, 3.0), mode="fusion") and len({a, a}) == 1
    assert RouteOptions(filter={"b": 1, "a": 2}).key == RouteOptions(filter={"a": 2, "b": 1}).key
    assert a.replace(mode=None) is a  # None keeps the current value
    with pytest.raises(RetrievalError, match="top_k"):
        a.replace(top_k=2)
    with pytest.raises(TypeError, match=r"unknown routing option\(s\) \['where'\]"):
        RouteOptions().replace(where={"a": 1})
    assert RouteOptions(exclude=[["a"], ["b", "c"]]).excludes_for(2) == [{"a"}, {"b", "c"}]
    with pytest.raises(RetrievalError, match="2 lists for 3 prompts"):
        RouteOptions(exclude=[["a"], ["b"]]).excludes_for(3)


def test_call_kwargs_split_into_generation_and_routing_by_the_same_names():
    config, options = split_call_options(
        {"max_new_tokens": 3, "stop": "\n", "top_k": 2, "routing_temperature": 0.5},
        GenerationConfig(),
        RouteOptions(weighting="softmax"),
    )
    assert (config.max_new_tokens, config.stop) == (3, ("\n",))
    assert (options.top_k, options.weighting, options.routing_temperature) == (2, "softmax", 0.5)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['temprature'\]"):
        split_call_options({"temprature": 1.0}, GenerationConfig(), RouteOptions())


def test_cli_flags_are_derived_from_route_options():
    parser = argparse.ArgumentParser()
    add_route_arguments(parser)
    args = parser.parse_args(
        ["--top-k", "2", "--filter", "customer=a", "--filter", "tier=gold", "--routing-temperature", "0.1"]
    )
    assert route_options_from(args) == {
        "top_k": 2,
        "filter": {"customer": "a", "tier": "gold"},
        "routing_temperature": 0.1,
    }
    with pytest.raises(RetrievalError, match="--filter 'nokey' must look like KEY=VALUE"):
        route_options_from(parser.parse_args(["--filter", "nokey"]))
    with pytest.raises(RetrievalError, match="takes no filter"):
        route_options_from(parser.parse_args(["--mode", "meteora", "--filter", "a=b"]))
