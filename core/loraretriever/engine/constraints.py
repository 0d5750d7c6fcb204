"""Grammar-constrained decoding: a request's text follows its grammar, token by token.

A request with ``GenerationConfig.grammar`` (an llguidance grammar: from :func:`json_schema_grammar`,
or Lark with ``%json {...}`` rules) gets its own matcher; before each of its tokens is chosen the
matcher's mask sets every token the grammar forbids to ``-inf``, and the chosen token advances it.
Rows with and without grammars share the batch; only the constrained rows pay for masks (on this
CPU 0.05-0.2 ms a token with SmolLM2's 49k vocabulary). llguidance was chosen for having no
dependencies beyond itself (xgrammar pulls the GPU toolchain, triton, into a CPU install).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from loraretriever.engine.extras import import_optional
from loraretriever.errors import InvalidOptionError

__all__ = ["Grammars", "json_rule", "json_schema_grammar", "lark_grammar"]

COMPACT = {"whitespace_flexible": False}  # JSON without runs of free whitespace a small model loves


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """The grammar of JSON text that validates against ``schema`` (compact whitespace).

    Example:
        >>> grammar = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}})
        >>> isinstance(grammar, str)
        True
    """
    return import_optional("llguidance").LLMatcher.grammar_from_json_schema(json.dumps(_compact(schema)))


def json_rule(schema: Mapping[str, Any]) -> str:
    """A Lark rule body for JSON that validates against ``schema`` (compact whitespace), for
    :func:`lark_grammar`: ``'call: ' + json_rule(schema)``."""
    return "%json " + json.dumps(_compact(schema))


def lark_grammar(lark: str) -> str:
    """A grammar from Lark text (llguidance's dialect: ``%json {schema}`` embeds a JSON schema; see
    :func:`json_rule`)."""
    return import_optional("llguidance").LLMatcher.grammar_from_lark(lark)


def _compact(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(schema), "x-guidance": {**COMPACT, **dict(schema.get("x-guidance", {}))}}


class Grammars:
    """An engine's matchers: the llguidance view of its tokenizer (built on first use) and the masks.

    Args:
        tokenizer: The model's tokenizer.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._ll: Any = None

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher of ``grammar``.

        Raises:
            ValueError: a grammar llguidance cannot compile, with its reason.
        """
        if self._ll is None:
            self._ll = import_optional("llguidance.hf").from_tokenizer(self.tokenizer)
        matcher = import_optional("llguidance").LLMatcher(self._ll, grammar)
        if matcher.is_error():
            raise InvalidOptionError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher

    def mask(self, logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Any]) -> None:
        """Sets, in place, the logits of every token the rows' grammars forbid to ``-inf``."""
        ll_torch = import_optional("llguidance.torch")
        bitmask = ll_torch.allocate_token_bitmask(len(rows), self._ll.vocab_size)
        for i, matcher in enumerate(matchers):
            ll_torch.fill_next_token_bitmask(matcher, bitmask, i)
        index = torch.tensor(list(rows), device=logits.device)
        picked = logits.index_select(0, index).float()
        vocab = min(picked.shape[1], self._ll.vocab_size)
        constrained = picked[:, :vocab].cpu()
        ll_torch.apply_token_bitmask_inplace(constrained, bitmask)
        picked[:, :vocab] = constrained.to(picked.device)
        picked[:, vocab:] = float("-inf")  # padding rows of the embedding are never text
        logits.index_copy_(0, index, picked.to(logits.dtype))
