"""``loraretriever train-gate``: trains a LoRA-Flow or MeteoRA gate on a pool, everything else frozen.

* ``flow``: every example is routed as at serving time (its retrieved top-k become the gate's
  slots); the loss is the LM loss on the target tokens.
* ``meteora``: every example goes through the gate over the whole pool (top-k per token); the loss
  is the LM loss plus ``aux_weight`` times the cross-entropy between each gated layer's logits and
  the example's task (the adapter of that name) on every token, as in MeteoRA, except the prefix
  that all examples share (the chat template's system prompt): a causal model's hidden states
  there cannot depend on the task, so their labels would only teach the gate the task prior.

The gate is saved with the pool (``POOL_DIR/gates/<name>``), next to a ``training.json`` record.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loraretriever.engine.gates import (
    FlowGate,
    FlowGateConfig,
    Gate,
    MeteoraGate,
    MeteoraGateConfig,
)
from loraretriever.engine.routing import Routing
from loraretriever.training.lora import collate, encode_example

__all__ = ["GateTrainingConfig", "load_examples", "train_gate"]


@dataclass(frozen=True)
class GateTrainingConfig:
    """How a gate is trained."""

    kind: str = field(default="flow", metadata={"help": "'flow' (LoRA-Flow) or 'meteora' (MeteoRA)."})
    steps: int = field(default=50, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    k: int = field(default=3, metadata={"help": "flow: LoRA slots (the retrieval top-k)."})
    top_k: int = field(default=2, metadata={"help": "meteora: adapters per token."})
    temperature: float = field(default=1.0, metadata={"help": "The gate's softmax temperature."})
    aux_weight: float = field(default=1.0, metadata={"help": "meteora: weight of the task cross-entropy."})
    max_length: int = field(default=160, metadata={"help": "Tokens per example (prompt cut from the left)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "meteora"):
            raise ValueError(f"kind={self.kind!r} must be 'flow' or 'meteora'.")
        for name in ("steps", "batch_size", "k", "top_k", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not self.learning_rate > 0 or self.aux_weight < 0:
            raise ValueError(
                f"learning_rate={self.learning_rate!r} must be > 0 and aux_weight={self.aux_weight!r} >= 0."
            )


def load_examples(data: str | Path, n: int | None = None, split: str = "train", seed: int = 0) -> list[dict]:
    """Examples ``{"inputs", "targets", "task"}`` from a JSON list (the paper's format) or a directory
    of ``<task>.json`` splits (its ``split``), ``n`` of them taken round-robin over tasks.

    Raises:
        ValueError: an example without inputs, targets or task.
    """
    from loraretriever.retrieval.queries import load_queries

    path = Path(data)
    records = load_queries(path, split)
    for i, record in enumerate(records):
        missing = [key for key in ("inputs", "targets", "task") if not str(record.get(key, "")).strip()]
        if missing:
            raise ValueError(
                f"example {i} of {str(path)!r} has no {missing}; every example needs inputs, targets, task."
            )
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    rng = random.Random(seed)
    for rows in by_task.values():
        rng.shuffle(rows)
    ordered = [
        rows[i] for i in range(max(map(len, by_task.values()), default=0)) for rows in by_task.values() if i < len(rows)
    ]
    return ordered[:n] if n is not None else ordered


def train_gate(
    lm,
    examples: Sequence[dict],
    name: str,
    config: GateTrainingConfig,
    *,
    route_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Gate, dict[str, Any]]:
    """Trains a gate of ``config.kind`` for ``lm``'s pool, registers it as ``name`` and returns it
    with a record of the run (losses, seconds, parameter count).

    ``route_options`` (e.g. ``{"weighting": "softmax", "routing_temperature": 0.02}``) route the flow
    examples; serve the gate with the same options, since the retrieval weights are its prior.

    Raises:
        ValueError: meteora examples whose task is not an adapter of the pool.
    """
    model, tokenizer, pool = lm.model, lm.tokenizer, lm.pool
    if not examples:
        raise ValueError("train_gate needs at least one example.")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if config.kind == "flow":
        gate: Gate = FlowGate(
            FlowGateConfig(config.k, model.config.hidden_size, model.config.num_hidden_layers, config.temperature)
        )
        routings = lm.route(
            [e["inputs"] for e in examples], **{**(route_options or {}), "top_k": config.k, "mode": "mixture"}
        )
        routings = [
            r if r.is_base else Routing(r.adapters, r.weights, r.similarities, "flow", gate=name) for r in routings
        ]
        labels_of = None
    else:
        unknown = sorted({e["task"] for e in examples} - set(pool.names))
        if unknown:
            raise ValueError(f"meteora examples name tasks {unknown} that are not adapters of the pool.")
        modules = {m: model.get_submodule(m).in_features for n in pool.names for m in pool.get(n).modules}
        gate = MeteoraGate(
            MeteoraGateConfig(
                tuple(pool.names),
                {n: pool.get(n).digest for n in pool.names},
                modules,
                config.top_k,
                config.temperature,
            )
        )
        routings = [Routing.meteora(name)] * len(examples)
        labels_of = [gate.config.adapters.index(e["task"]) for e in examples]
    encoded = [encode_example(tokenizer, e["inputs"], e["targets"], config.max_length) for e in examples]
    shared = _common_prefix([ids for ids, _ in encoded]) if len(encoded) > 1 else 0

    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()  # no dropout: the gate learns the serving-time model
    lm.composer.gates.register(name, gate)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.learning_rate)
    losses: list[float] = []
    aux_losses: list[float] = []
    start = time.perf_counter()
    try:
        progress = tqdm(range(config.steps), desc=f"{config.kind} gate", leave=False)
        for _ in progress:
            picked = [rng.randrange(len(examples)) for _ in range(config.batch_size)]
            batch, labels = collate([encoded[i] for i in picked], tokenizer.pad_token_id)
            keep = int((labels != -100).sum(-1).max()) + 1
            lm.composer.gate_logits = [] if labels_of is not None else None
            with lm.composer.apply([routings[i] for i in picked]):
                logits = model(**batch, logits_to_keep=keep).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels[:, -(keep - 1) :].reshape(-1), ignore_index=-100
            )
            if labels_of is not None:
                # position ids count real tokens only, so they mark the shared prefix in left-padded rows
                own = (batch["attention_mask"] == 1) & (batch["position_ids"] >= shared)
                task = torch.tensor([labels_of[i] for i in picked])[:, None].expand_as(own)
                task = task.masked_fill(~own, -100).reshape(-1)
                recorded = lm.composer.gate_logits
                aux = sum(torch.nn.functional.cross_entropy(g, task, ignore_index=-100) for *_, g in recorded)
                aux = aux / len(recorded)
                aux_losses.append(aux.item())
                loss = loss + config.aux_weight * aux
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        lm.composer.gate_logits = None
        for parameter, grad in zip(model.parameters(), grads, strict=True):
            parameter.requires_grad_(grad)
        model.train(was_training)
    gate.requires_grad_(False)
    gate.eval()
    window = max(1, len(losses) // 10)

    def mean(values: list[float]) -> float:
        return round(sum(values) / max(1, len(values)), 4)

    record = {
        "kind": config.kind,
        "name": name,
        "parameters": gate.num_parameters,
        "examples": len(examples),
        "tasks": len({e["task"] for e in examples}),
        "config": asdict(config),
        "route_options": dict(route_options or {}),
        "loss_first": mean(losses[:window]),
        "loss_last": mean(losses[-window:]),
        **(
            {"task_ce_first": mean(aux_losses[:window]), "task_ce_last": mean(aux_losses[-window:])}
            if aux_losses
            else {}
        ),
        "seconds": round(time.perf_counter() - start, 1),
    }
    log(
        f"{config.kind} gate {name!r}: {gate.num_parameters:,} parameters, loss {record['loss_first']} -> {record['loss_last']}"
    )
    return gate, record


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the token prefix every sequence starts with."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if len({s[i] for s in sequences}) > 1:
            return i
    return shortest - 1  # identical up to the shortest: keep its last token labelled
