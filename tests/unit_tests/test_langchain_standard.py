"""LangChain's standard chat-model unit tests (langchain-tests), on a tiny Llama."""

from __future__ import annotations

from functools import cache

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_loraretriever import ChatLoraRetriever
from loraretriever import LoraPool
from loraretriever.serving.routed_lm import RoutedLM
from tests.standard_flags import ChatLoraRetrieverFeatures


@cache
def tiny_routed_lm() -> RoutedLM:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraretriever.engine.base_model import default_model_path
    from tests.conftest import TINY_CONFIG

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG.to_dict(), "vocab_size": len(tokenizer)})).eval()
    return RoutedLM(model, tokenizer, LoraPool(model))


class TestChatLoraRetrieverUnit(ChatLoraRetrieverFeatures, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatLoraRetriever]:
        return ChatLoraRetriever

    @property
    def chat_model_params(self) -> dict:
        return {"lm": tiny_routed_lm()}

    @property
    def standard_chat_model_params(self) -> dict:
        # the suite adds api_key="test"; a local model takes no key, and an unknown argument is an error
        return {k: v for k, v in super().standard_chat_model_params.items() if k != "api_key"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one local base model per object; routing, not `model=`, picks the LoRAs
