"""Adding and removing adapters at run time, across the pool, its directory and the router's index.

Each change is all-or-nothing: a failure at any step undoes the steps already taken, so the
pool, the directory and the index are left as they were. With a pool directory, each change holds
its lock from the first step to the last (:func:`~loraretriever.pool.directory.pool_change`), so
processes that share the directory see whole changes only, and records its intent first: a
process killed mid-change leaves the intent, and :func:`recover` (run whenever a pool directory is
opened) undoes the change whole, so the adapter is there with its card and vector, or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraretriever.engine.base_model import model_source
from loraretriever.errors import InvalidOptionError, NotFoundError
from loraretriever.pool.adapter import (
    CONFIG_FILE,
    AdapterError,
    AdapterExistsError,
    AdapterMismatchError,
    check_adapter_name,
    read_adapter_files,
)
from loraretriever.pool.directory import (
    adapter_dirs,
    clear_intent,
    delete_adapter,
    intents,
    leftovers,
    pool_change,
    quarantine,
    record_intent,
    recover,
    store_adapter,
)
from loraretriever.pool.layout import PoolLayout
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.pool.manifest import PoolMismatchError, check_pool_model, record_pool_model, recorded_model
from loraretriever.retrieval.cards import AdapterCard, CardStore, RetrievalError, read_json
from loraretriever.retrieval.index import index_damage, set_aside_index

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = [
    "add_adapter",
    "add_dir_to_pool_dir",
    "add_to_pool_dir",
    "check_pool_dir",
    "open_pool_dir",
    "ready_pool_dir",
    "remove_adapter",
    "remove_from_pool_dir",
]


def add_adapter(
    pool: LoraPool,
    router: Any,
    pool_dir: Path | None,
    source: str | Path,
    card: AdapterCard | dict[str, Any] | None = None,
    *,
    name: str | None = None,
) -> str:
    """Stores (with a pool directory), loads and registers an adapter; returns its name.

    Raises:
        ValueError: a card whose name differs from the adapter's, or a card without a router.
        AdapterError, RetrievalError: from the failed step, after undoing the others.
    """
    card, name = _card_and_name(source, card, name)
    if card is not None and router is None:
        raise InvalidOptionError("a card needs a router; open the RoutedLM with pool_dir= or router=.")
    with _change(pool_dir):
        if pool_dir is None:
            return _add(pool, router, pool_dir, source, card, name)
        check_adapter_name(name)
        record_intent(pool_dir, "add", name)
        try:
            return _add(pool, router, pool_dir, source, card, name)
        finally:  # done, or undone by _add: either way nothing is left half made
            clear_intent(pool_dir, name)


def _card_and_name(source: str | Path, card: Any, name: str | None) -> tuple[AdapterCard | None, str]:
    if card is not None and not isinstance(card, AdapterCard):
        card = AdapterCard.from_dict({"name": name or Path(str(source)).name, **dict(card)})
    name = name or (card.name if card is not None else Path(str(source).rstrip("/")).name)
    if card is not None and card.name != name:
        raise InvalidOptionError(f"the card is named {card.name!r} but the adapter {name!r}; they must match.")
    return card, name


def add_to_pool_dir(
    pool_dir: str | Path,
    source: str | Path,
    card: AdapterCard | dict[str, Any] | None = None,
    *,
    name: str | None = None,
    model_id: str | Path | None = None,
    model: PreTrainedModel | None = None,
) -> str:
    """Stores an adapter and its card in a pool directory without opening the pool's index: the
    cards are the source of truth, and whoever routes reconciles the index with them (a running
    server at its next sync). So short-lived writers (``loraretriever pool add``) never contend
    for an embedded index another process holds; they take turns on the pool lock.

    The adapter is loaded with the pool's base model (``model_id``, default: the one its manifest
    records; or ``model``, already loaded) first, so one that does not fit or is damaged is refused
    and nothing is stored.

    Raises:
        PoolMismatchError: ``model_id`` is not the pool's model.
        AdapterError, RetrievalError, ValueError: a bad adapter, card or name; nothing is left behind.
    """
    root = Path(pool_dir).expanduser()
    card, name = _card_and_name(source, card, name)
    check_adapter_name(name)
    model = model if model is not None else _pool_model(root, model_id)
    recorded = check_pool_model(root, model, model_source(model))
    recover(root)  # a change a killed writer left half done goes first (its name is free again)
    pool = LoraPool(model)
    try:
        if not recorded:  # a pool without a manifest: its adapters tell whether the model is its own
            _register_stored(pool, root)
        pool.add(source, name=name)  # every check a load makes (fit, NaN, bounds), before anything is written
    finally:
        pool.close()
    cards = CardStore(PoolLayout(root).cards)
    with pool_change(root):
        if name in adapter_dirs(root) or name in cards:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already in the pool {str(root)!r}. Fix: pick another name."
            )
        record_intent(root, "add", name)
        try:
            store_adapter(root, source, name)
            if card is not None:
                cards.put(card)
        except BaseException:
            with contextlib.suppress(KeyError):
                delete_adapter(root, name)
            raise
        finally:  # done, or undone above: either way nothing is left half made
            clear_intent(root, name)
        if not recorded:
            record_pool_model(root, model, model_source(model))
    return name


def add_dir_to_pool_dir(
    pool_dir: str | Path,
    directory: str | Path,
    *,
    samples: str | None = None,
    prompt_field: str = "prompt",
    n: int = 20,
    model_id: str | Path | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Adds every PEFT adapter directory under ``directory`` (those with an ``adapter_config.json``)
    with :func:`add_to_pool_dir`, each all-or-nothing: one that fails is reported and the rest go on.

    Each adapter's card is ``<adapter dir>/card.json`` if there is one, else ``n`` prompts drawn
    (seeded, in file order) from ``<adapter dir>/<samples>``, a JSONL file of objects whose
    ``prompt_field`` holds a prompt; an adapter with neither is added without a card (pinned calls only).

    Returns:
        ``{"added": [names], "without_card": [names], "failed": {name: reason}}``.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise AdapterError(f"{str(root)!r} is not a directory. Fix: pass a directory holding PEFT adapter directories.")
    if n < 1:
        raise InvalidOptionError(f"n={n!r} must be a positive number of samples per card.", param="n")
    report: dict[str, Any] = {"added": [], "without_card": [], "failed": {}}
    model = _pool_model(Path(pool_dir).expanduser(), model_id)  # loaded once for every adapter
    for source in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
        try:
            card = _card_from_dir(source, samples, prompt_field, n)
            add_to_pool_dir(pool_dir, source, card, name=source.name, model=model)
        except PoolMismatchError:  # the model is not the pool's: no adapter would go in
            raise
        except (AdapterError, RetrievalError, ValueError, OSError) as error:
            report["failed"][source.name] = str(error)
            log(f"failed {source.name}: {error}")
            continue
        report["added"].append(source.name)
        if card is None:
            report["without_card"].append(source.name)
        log(f"added {source.name}" + ("" if card is not None else " (no card: pinned calls only)"))
    return report


def _pool_model(root: Path, model_id: str | Path | None) -> PreTrainedModel:
    """The base model to check adapters against: ``model_id``, else the one the pool records."""
    from loraretriever.engine.base_model import shared_base_model

    model, _ = shared_base_model(model_id if model_id is not None else recorded_model(root))
    return model


def _card_from_dir(source: Path, samples: str | None, prompt_field: str, n: int) -> dict[str, Any] | None:
    card_file = source / "card.json"
    if card_file.is_file():
        card = read_json(card_file, "card")
        if not isinstance(card, dict):
            raise RetrievalError(f"card file {str(card_file)!r} must hold a JSON object ({{'samples': [...]}}).")
        return card
    if samples is None or not (source / samples).is_file():
        return None
    prompts = []
    with (source / samples).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line).get(prompt_field)
            except (ValueError, AttributeError) as error:
                raise RetrievalError(
                    f"{str(source / samples)!r} line {number} is not a JSON object ({error})."
                ) from None
            if isinstance(value, str) and value.strip():
                prompts.append(value)
    if not prompts:
        raise RetrievalError(
            f"{str(source / samples)!r} has no {prompt_field!r} field with text. Fix: --prompt-field names the "
            "field that holds the prompts."
        )
    keep = sorted(random.Random(0).sample(range(len(prompts)), min(n, len(prompts))))
    return {"samples": [prompts[i] for i in keep]}


def remove_from_pool_dir(pool_dir: str | Path, name: str) -> None:
    """Removes an adapter and its card from a pool directory without opening its index or loading
    a model; whoever routes drops the vector when it reconciles.

    Raises:
        KeyError: the pool has no adapter or card of that name.
    """
    root = Path(pool_dir).expanduser()
    check_adapter_name(name)
    cards = CardStore(PoolLayout(root).cards)
    with pool_change(root):
        if name not in adapter_dirs(root) and name not in cards:
            raise NotFoundError(f"the pool {str(root)!r} has no adapter named {name!r}.", param="name")
        record_intent(root, "remove", name)
        if name in cards:  # the card first: a router never routes to a missing adapter
            cards.remove(name)
        if name in adapter_dirs(root):
            delete_adapter(root, name)
        clear_intent(root, name)


def _add(pool: LoraPool, router: Any, pool_dir: Path | None, source: str | Path, card: Any, name: str) -> str:
    stored = store_adapter(pool_dir, source, name) if pool_dir is not None else None
    try:
        pool.add(stored or source, name=name)
    except BaseException:
        if stored is not None:
            delete_adapter(pool_dir, name)
        raise
    if card is not None:
        try:
            router.register(card)
        except BaseException:
            pool.remove(name)
            if stored is not None:
                delete_adapter(pool_dir, name)
            raise
    return name


def remove_adapter(pool: LoraPool, router: Any, pool_dir: Path | None, name: str) -> None:
    """Removes an adapter: its card and index entry first (so it is never routed while missing),
    then the pool entry and the stored files."""
    pool.check_names([name])
    with _change(pool_dir):
        if pool_dir is not None:
            record_intent(pool_dir, "remove", name)  # cleared only once every step is done
        store = getattr(router, "store", None)
        if store is not None and name in store:
            router.unregister(name)
        pool.remove(name)
        if pool_dir is not None and name in adapter_dirs(pool_dir):
            delete_adapter(pool_dir, name)
        if pool_dir is not None:
            clear_intent(pool_dir, name)


def _change(pool_dir: Path | None) -> contextlib.AbstractContextManager:
    return pool_change(pool_dir) if pool_dir is not None else contextlib.nullcontext()


def open_pool_dir(pool: LoraPool, pool_dir: str | Path, *, cards: CardStore | None = None) -> dict[str, list[str]]:
    """Readies a pool directory and registers its adapters in ``pool`` (config and shapes read now,
    weights at their first use): recovers interrupted changes (:func:`recover`), then moves each
    adapter that fails to register or, later, to load, and each card that cannot be read to
    ``POOL_DIR/quarantine/`` with its reason, so one bad file never stops the rest.

    ``cards`` is the pool's card store, if the caller keeps one (the router): each card is then
    parsed once, here, and the router's reconcile reuses it.

    Returns:
        ``{"loaded": [...], "quarantined": [...], "undone": [...]}`` (adapter names).
    """
    root = Path(pool_dir).expanduser()
    # a pool of another model is refused untouched
    recorded = check_pool_model(root, pool.model, model_source(pool.model))
    undone = recover(root)["undone"]
    bad = []

    def quarantine_broken(name: str, error: AdapterError) -> None:  # found at its first load
        if PoolLayout(root).adapter(name).is_dir() and not isinstance(error, AdapterMismatchError):
            quarantine(root, name, f"the adapter does not load: {error}")

    loaded, damaged = _register_stored(pool, root)
    pool.on_load_error(quarantine_broken)
    for name, error in damaged.items():
        quarantine(root, name, f"the adapter does not load: {error}")
        bad.append(name)
    if not recorded:
        try:
            record_pool_model(root, pool.model, model_source(pool.model))
        except OSError as error:  # a read-only pool still opens
            logger.warning("could not record the base model in %s: %s", PoolLayout(root).manifest, error)
    bad += quarantine_broken_cards(root, cards if cards is not None else CardStore(PoolLayout(root).cards))
    return {"loaded": loaded, "quarantined": sorted(set(bad)), "undone": undone}


def _register_stored(pool: LoraPool, root: Path) -> tuple[list[str], dict[str, AdapterError]]:
    """Registers the stored adapters not in ``pool`` yet (config and shapes read, not weights);
    returns those registered and those damaged.

    Raises:
        PoolMismatchError: adapters that are sound but of another base model; none is left
            registered, nothing is moved.
    """
    loaded, damaged, unfit = [], {}, []
    for name, path in adapter_dirs(root).items():
        if name in pool:
            continue
        try:
            loaded.append(pool.register(path, name=name))
        except AdapterMismatchError as error:
            unfit.append(error)
        except AdapterError as error:
            damaged[name] = error
    if unfit:
        for name in loaded:
            pool.remove(name)
        raise PoolMismatchError(
            f"{len(unfit)} adapter(s) of the pool {str(root)!r} do not fit the base model {model_source(pool.model)!r}; "
            f"they were trained for another one (the first: {unfit[0]}). Fix: open the pool with the model its "
            "adapters were trained on."
        )
    return loaded, damaged


def quarantine_broken_cards(pool_dir: Path, cards: CardStore) -> list[str]:
    """Moves each card of ``cards`` that cannot be read (and its adapter) to quarantine; returns
    their names. Each card is parsed once: ``cards`` keeps it for the router."""
    bad = []
    for name in cards.names:
        try:
            cards.get(name)
        except RetrievalError as error:
            quarantine(pool_dir, name, f"the card cannot be read: {error}")
            bad.append(name)
    return bad


def ready_pool_dir(pool_dir: str | Path, cards: CardStore | None = None) -> dict[str, list[str]]:
    """Readies a pool directory for a router without a model (route, reindex, calibrate, serve
    --backend): interrupted changes undone, unreadable cards quarantined, so one bad file never
    stops the rest. :func:`open_pool_dir` does this and more for a pool with its model.

    Returns:
        ``{"quarantined": [...], "undone": [...]}`` (adapter names).
    """
    root = Path(pool_dir).expanduser()
    undone = recover(root)["undone"]
    bad = quarantine_broken_cards(root, cards if cards is not None else CardStore(PoolLayout(root).cards))
    return {"quarantined": bad, "undone": undone}


def check_pool_dir(pool_dir: str | Path, *, repair: bool = False) -> list[str]:
    """The problems of a pool directory, read from its files (no model needed): interrupted
    changes, staging or trash left behind, stored adapters whose files do not read, cards that do
    not parse, cards without a stored adapter, an index that cannot be read. With ``repair``, each
    is fixed (the change undone, the leftover deleted, the broken entry quarantined, the index set
    aside to be rebuilt from the cards) and the problems left are returned.
    """
    root = Path(pool_dir).expanduser()
    problems = [f"interrupted {op} of {name!r} (undone on the next open)" for name, op in intents(root).items()]
    problems += [f"leftover {path} from an interrupted write" for path in leftovers(root)]
    if repair and problems:
        recover(root)
        problems = []
    stored = adapter_dirs(root)
    broken: dict[str, str] = {}
    for name, path in stored.items():
        try:
            read_adapter_files(path)
        except AdapterError as error:
            broken[name] = f"the adapter does not read: {error}"
    cards = CardStore(PoolLayout(root).cards) if PoolLayout(root).cards.is_dir() else None
    for name in cards.names if cards is not None else ():
        try:
            cards.get(name)
        except RetrievalError as error:
            broken.setdefault(name, f"the card cannot be read: {error}")
            continue
        if name not in stored:
            broken.setdefault(name, "a card without a stored adapter (it would route to nothing)")
    for name, reason in sorted(broken.items()):
        if repair:
            quarantine(root, name, reason)
        else:
            problems.append(f"{name!r}: {reason}")
    damage = index_damage(PoolLayout(root).index)
    if damage is not None and repair:
        set_aside_index(PoolLayout(root).index)
    elif damage is not None:
        problems.append(f"the index is corrupt: {damage} (set aside and rebuilt from the cards on the next open)")
    return problems
