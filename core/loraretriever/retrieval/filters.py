"""Routing filters: a user's ``filter`` option translated to Chroma's ``where`` over card metadata.

Cards are stored with flat metadata (``name``, ``domain``, ``tag.<key>``), so a filter names
``name``, ``domain``, a tag key (``customer`` means ``tag.customer``) or ``tag.<key>``. A key that
no indexed card carries is an error rather than a filter that silently matches nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from loraretriever.retrieval.cards import RetrievalError

__all__ = ["BUILTIN_KEYS", "chroma_where"]

BUILTIN_KEYS = frozenset({"name", "domain"})
_FIELD_OPERATORS = {"$eq", "$ne", "$in", "$nin"}
_LOGICAL_OPERATORS = {"$and", "$or"}


def chroma_where(filter: Mapping[str, Any] | None, known_keys: Callable[[bool], set[str]]) -> dict[str, Any] | None:
    """Translates ``filter`` to a Chroma ``where``.

    Args:
        filter: Keys as above; values a string or ``{"$eq"|"$ne"|"$in"|"$nin": ...}``; ``$and`` /
            ``$or`` take lists of filters.
        known_keys: ``known_keys(refresh)`` gives the metadata keys of the indexed cards; it is
            called again with ``refresh=True`` before a key is called unknown (another replica may
            have added it).

    Raises:
        RetrievalError: a malformed filter or an unknown key, naming it and the known ones.

    Example:
        >>> keys = lambda refresh: {"name", "domain", "tag.customer"}
        >>> chroma_where({"customer": "a", "domain": {"$in": ["nli"]}}, keys)
        {'$and': [{'tag.customer': 'a'}, {'domain': {'$in': ['nli']}}]}
    """
    if not filter:
        return None
    if not isinstance(filter, Mapping):
        raise RetrievalError(f"filter {filter!r} must be a dict such as {{'customer': 'a'}}.")
    clauses = [_clause(key, value, known_keys) for key, value in filter.items()]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _clause(key: str, value: Any, known_keys: Callable[[bool], set[str]]) -> dict[str, Any]:
    if key in _LOGICAL_OPERATORS:
        if not isinstance(value, list) or len(value) < 1:
            raise RetrievalError(f"filter {key} needs a non-empty list of filters, not {value!r}.")
        parts = [chroma_where(item, known_keys) for item in value]
        return parts[0] if len(parts) == 1 else {key: parts}
    if key.startswith("$"):
        raise RetrievalError(f"filter operator {key!r} is not supported here; use $and or $or at the top level.")
    field_name = key if key in BUILTIN_KEYS or key.startswith("tag.") else f"tag.{key}"
    known = known_keys(False)
    if field_name not in known:
        known = known_keys(True)
    if field_name not in known:
        tags = sorted(k.removeprefix("tag.") for k in known if k.startswith("tag."))
        raise RetrievalError(
            f"unknown filter key {key!r}: no indexed card has it. Known keys: name, domain and the tags "
            f"{tags}. Fix: check the spelling, or tag the cards first."
        )
    if isinstance(value, Mapping):
        if len(value) != 1 or next(iter(value)) not in _FIELD_OPERATORS:
            raise RetrievalError(
                f"filter {key!r}: {value!r} must be a string or one of {sorted(_FIELD_OPERATORS)}, e.g. "
                f"{{'$in': ['a', 'b']}}."
            )
        operator, operand = next(iter(value.items()))
        if operator in ("$in", "$nin") and (not isinstance(operand, list) or not operand):
            raise RetrievalError(f"filter {key!r}: {operator} needs a non-empty list, not {operand!r}.")
        return {field_name: {operator: operand}}
    if not isinstance(value, str):
        raise RetrievalError(f"filter {key!r}: value {value!r} must be a string (tags are strings).")
    return {field_name: value}
