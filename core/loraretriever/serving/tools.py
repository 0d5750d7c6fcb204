"""Tool calling and structured output, in OpenAI's terms, on any base model.

The call options ``tools`` (OpenAI function specs), ``tool_choice`` (``"auto"``, ``"none"``,
``"required"`` / ``"any"``, or a tool's name) and ``response_format`` (``{"type": "json_schema",
"json_schema": {"schema": ...}}`` or ``{"type": "json_object"}``) become:

* the tools, rendered by the chat template (``apply_chat_template(tools=...)``) when it renders
  them in the Hermes / Qwen form, else described in a system message in that same form, which any
  template can carry: a call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* a grammar (:mod:`loraretriever.engine.constraints`) when the output is forced: a required tool
  call is always one of the tools with arguments valid against its schema, and a response format
  always validates. With ``"auto"`` the model chooses text or a call, and the text is parsed;
* the answer parsed back: ``tool_calls`` (``invalid_tool_calls`` for a call that does not parse).

Routing is untouched: a chat is still routed by its last user message, never by tool JSON.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraretriever.engine.constraints import json_rule, json_schema_grammar, lark_grammar
from loraretriever.engine.requests import Prompt
from loraretriever.errors import InvalidOptionError, InvalidTypeError

__all__ = [
    "TOOL_OPTIONS",
    "ToolCalls",
    "ToolSpec",
    "parse_tool_calls",
    "renders_tools",
    "tool_call_text",
    "with_tools",
]

TOOL_OPTIONS: tuple[str, ...] = ("tools", "tool_choice", "response_format")
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    """How one call uses tools: the tools (OpenAI function specs) and the choice."""

    tools: tuple[Mapping[str, Any], ...]
    choice: str

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


@dataclass(frozen=True)
class ToolCalls:
    """A parsed answer: the text outside calls, the calls, and the calls that did not parse."""

    content: str
    calls: tuple[dict[str, Any], ...] = ()
    invalid: tuple[dict[str, Any], ...] = ()


def _function(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise InvalidTypeError(f"tools[{index}] is a {type(tool).__name__}; pass OpenAI function specs (dicts).")
    spec = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if spec is None or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidOptionError(f"tools[{index}] = {dict(tool)!r} is not a function spec with a name.")
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise InvalidOptionError(f"tools[{index}] ({spec['name']!r}): parameters must be a JSON schema object.")
    return {"type": "function", "function": {**dict(spec), "parameters": dict(parameters)}}


def _tool_spec(tools: Sequence[Any] | None, choice: Any) -> ToolSpec | None:
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidOptionError(f"tool_choice={choice!r} needs tools; pass tools=[...].", param="tool_choice")
        return None
    normalized = tuple(_function(t, i) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in normalized]
    if isinstance(choice, Mapping):  # OpenAI's {"type": "function", "function": {"name": ...}}
        choice = choice.get("function", {}).get("name") or choice.get("name")
    choice = "auto" if choice is None else choice
    if choice == "any":
        choice = "required"
    if choice not in ("auto", "none", "required") and choice not in names:
        raise InvalidOptionError(
            f"tool_choice={choice!r} is not 'auto', 'none', 'required' or a tool name ({names}).", param="tool_choice"
        )
    return ToolSpec(normalized, choice)


def _instructions(spec: ToolSpec) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in spec.tools)
    forced = {
        "auto": "Call a tool when it helps; otherwise answer in plain text.",
        "required": "You must call one of the tools.",
    }.get(spec.choice, f"You must call the tool {spec.choice!r}.")
    return (
        "You can call these tools (JSON schemas of their arguments):\n"
        f"{listed}\n"
        'To call a tool, answer with <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>. '
        f"{forced} A tool's result comes back in a message of its own."
    )


def _call_grammar(spec: ToolSpec) -> str:
    chosen = [t for t in spec.tools if spec.choice == "required" or t["function"]["name"] == spec.choice]
    # arguments get no properties beyond the schema's unless it allows them (OpenAI's strict mode):
    # a subset of what the schema accepts, so every forced call still validates against it
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": {"additionalProperties": False, **t["function"]["parameters"]},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return lark_grammar(f'start: "<tool_call>" call "</tool_call>"\ncall: {json_rule(schema)}')


def _format_grammar(response_format: Any) -> str | None:
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping) or "type" not in response_format:
        raise InvalidOptionError(
            f"response_format={response_format!r} must be a dict with a 'type'.", param="response_format"
        )
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, Mapping):
            raise InvalidOptionError("response_format json_schema needs {'json_schema': {'schema': {...}}}.")
        return json_schema_grammar(schema)
    raise InvalidOptionError(f"response_format type {kind!r} is not 'text', 'json_object' or 'json_schema'.")


def renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders tools itself in the form parsed here (Hermes / Qwen:
    ``apply_chat_template(tools=...)`` and ``<tool_call>`` blocks)."""
    return bool(chat_template) and "tools" in chat_template and "<tool_call>" in chat_template


def with_tools(
    prompt: Prompt, options: Mapping[str, Any], chat_template: str | None = None
) -> tuple[Prompt, str | None, ToolSpec | None, tuple[dict[str, Any], ...] | None]:
    """The prompt with its tools described, the grammar its answer must follow, the tool spec, and
    the tools for the chat template to render.

    A template that renders tools (:func:`renders_tools`) gets them through
    ``apply_chat_template(tools=...)`` as the model was trained; any other gets the same call
    format described in a system message.

    Raises:
        TypeError, ValueError: malformed tools, a tool choice naming no tool, a bad response format.
    """
    spec = _tool_spec(options.get("tools"), options.get("tool_choice"))
    grammar = _format_grammar(options.get("response_format"))
    if spec is None or spec.choice == "none":
        return prompt, grammar, None, None
    if grammar is not None:
        raise InvalidOptionError("tools and response_format both constrain the answer; pass one of them.")
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    call_grammar = _call_grammar(spec) if spec.choice != "auto" else None
    if renders_tools(chat_template):
        return chat, call_grammar, spec, spec.tools
    note = _instructions(spec)
    if chat[0]["role"] == "system":
        chat[0] = {**chat[0], "content": f"{chat[0]['content']}\n\n{note}"}
    else:
        chat.insert(0, {"role": "system", "content": note})
    return chat, call_grammar, spec, None


def tool_call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the model writes it, for an assistant turn read back into the next prompt."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False) + "</tool_call>"


def parse_tool_calls(text: str, spec: ToolSpec, cut: bool = False) -> ToolCalls:
    """Splits an answer into its text and its ``<tool_call>`` blocks (LangChain's ``tool_calls`` shape:
    ``{"name", "args", "id"}``; a block that is not a known tool with object arguments is invalid).
    ``cut``: the answer ran out of new tokens, which the error of an unfinished call says."""
    calls, invalid = [], []
    for block in _CALL.findall(text):
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        try:
            value = json.loads(block)
            name, args = value["name"], value.get("arguments", {})
            if name not in spec.names or not isinstance(args, dict):
                raise InvalidOptionError(
                    f"{name!r} is not one of the tools {spec.names}, or its arguments are not an object"
                )
            calls.append({"name": name, "args": args, "id": call_id})
        except (ValueError, KeyError, TypeError) as error:
            reason = f"{type(error).__name__}: {error}"
            if cut:
                reason += " (the answer reached max_new_tokens inside the call; raise max_new_tokens)"
            invalid.append({"name": None, "args": block, "id": call_id, "error": reason})
    content = _CALL.sub("", text).strip() if (calls or invalid) else text
    return ToolCalls(content, tuple(calls), tuple(invalid))
