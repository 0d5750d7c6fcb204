"""What ChatLoraRetriever supports, for both of LangChain's standard suites (unit and integration)."""

from __future__ import annotations


class ChatLoraRetrieverFeatures:
    """Tool calling, tool choice, structured output and JSON mode: on."""

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True
