"""LangChain's standard chat-model integration tests (langchain-tests), on SmolLM2-135M-Instruct."""

from __future__ import annotations

from functools import cache

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_loraretriever import ChatLoraRetriever
from loraretriever.serving.routed_lm import RoutedLM

pytestmark = pytest.mark.slow


@cache
def smollm_routed_lm() -> RoutedLM:
    """The default model with an empty pool: every call takes the routed path and gets the base model."""
    return RoutedLM.from_pretrained(None, max_wait_ms=5)


class TestChatLoraRetrieverIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatLoraRetriever]:
        return ChatLoraRetriever

    @property
    def chat_model_params(self) -> dict:
        return {"lm": smollm_routed_lm(), "max_new_tokens": 24}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False
