"""Long prompts and agent loops: what agents and RAG chains send (``bench serve``'s ``long_prompt``
and ``agent_loop``).

* ``long_prompt``: one chat prompt of about ``prompt_tokens`` tokens (a long system context and a
  short question), ``new_tokens`` greedy tokens: transformers' ``generate`` on the plain model,
  ours pinned to the base model and routed (a mixture of 3), timed in turns, the prefix cache off
  (every run computes its whole prompt); then the routed prompt once more with the cache on
  (``repeat_cached``).
* ``agent_loop``: the same system context and question, then ``calls - 1`` tool round trips: each
  call sends the whole conversation so far (every earlier answer and tool result), routed by the
  same question as agents are. Each call's seconds, and ``later_over_first``: the mean of calls
  2.. over call 1, with the prefix cache on and off.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from loraretriever.evaluation.workload import timed_in_turns
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["agent_conversation", "long_chat", "run_agent_loop", "run_long_prompt"]

CONTEXT = (
    "The quarterly report covers revenue, costs, hiring, and the roadmap for the platform team. "
    "Each section lists owners, deadlines and the risks we track. "
)
QUESTION = "Summarize the risks in the report in one sentence."
TOOL_RESULT = "Tool result {i}: the risk register lists {n} open items; the oldest is item {i} (owner: platform)."


def long_chat(tokenizer, prompt_tokens: int) -> list[dict[str, str]]:
    """A system context repeated to about ``prompt_tokens`` tokens of chat, and the question."""
    per = len(tokenizer(CONTEXT).input_ids)
    repeats = max(1, (prompt_tokens - 40) // per)
    system = "You are a helpful assistant. Use the context below.\n" + CONTEXT * repeats
    return [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]


def agent_conversation(chat: list[dict[str, str]], answers: list[str]) -> list[dict[str, str]]:
    """The conversation an agent sends after ``answers``: each answer, then its tool's result."""
    messages = list(chat)
    for i, answer in enumerate(answers):
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "tool", "content": TOOL_RESULT.format(i=i + 1, n=7 + i)},
        ]
    return messages


def run_long_prompt(
    make_lm: Callable[..., RoutedLM],
    model,
    tokenizer,
    prompt_tokens: int = 2500,
    new_tokens: int = 16,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Times one long prompt (see the module docstring). ``make_lm(**engine_options)`` opens a
    routed LM over ``model``."""
    chat = long_chat(tokenizer, prompt_tokens)
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    options = {"max_new_tokens": new_tokens, "ignore_eos": True}
    lm = make_lm(prefix_cache_gb=0)
    try:

        def hf() -> None:
            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )

        methods = {
            "hf_generate": hf,
            "ours_base": lambda: lm.generate([chat], adapters=[], **options),
            "ours_routed": lambda: lm.generate([chat], mode="mixture", top_k=3, **options),
        }
        routing = lm.generate([chat], mode="mixture", top_k=3, max_new_tokens=1)[0].routing
        seconds = {name: [t for t, _ in runs] for name, runs in timed_in_turns(methods, rounds).items()}
    finally:
        lm.close()
    cached_lm = make_lm()
    try:
        cached_lm.generate([chat], mode="mixture", top_k=3, **options)
        start = time.perf_counter()
        repeat = cached_lm.generate([chat], mode="mixture", top_k=3, **options)[0]
        repeat_s = time.perf_counter() - start
    finally:
        cached_lm.close()
    out = {
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "routing": str(routing),
        "seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "ratio_to_hf_generate": {
            k: round(statistics.median(a / b for a, b in zip(v, seconds["hf_generate"], strict=True)), 3)
            for k, v in seconds.items()
        },
        "repeat_cached_s": round(repeat_s, 3),
        "repeat_cached_tokens": repeat.cached_tokens,
    }
    out["targets_met"] = {
        "base<=1.05x_generate": out["ratio_to_hf_generate"]["ours_base"] <= 1.05,
        "routed<=1.15x_generate": out["ratio_to_hf_generate"]["ours_routed"] <= 1.15,
    }
    log(f"long_prompt: {out['seconds']} ratios {out['ratio_to_hf_generate']}, repeated with the cache {repeat_s:.2f} s")
    return out


def run_agent_loop(
    make_lm: Callable[..., RoutedLM],
    tokenizer,
    prompt_tokens: int = 2500,
    calls: int = 6,
    new_tokens: int = 16,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """An agent's tool loop with the prefix cache on and off (see the module docstring)."""
    chat = long_chat(tokenizer, prompt_tokens)
    out: dict[str, Any] = {"prompt_tokens_first_call": None, "calls": calls, "new_tokens": new_tokens}
    answers_by: dict[str, list[str]] = {}
    for name, options in (("cache_on", {}), ("cache_off", {"prefix_cache_gb": 0})):
        lm = make_lm(**options)
        try:
            answers: list[str] = []
            seconds, cached = [], []
            for _ in range(calls):
                start = time.perf_counter()
                result = lm.generate(
                    [agent_conversation(chat, answers)],
                    mode="mixture",
                    top_k=3,
                    max_new_tokens=new_tokens,
                    ignore_eos=True,
                )[0]
                seconds.append(time.perf_counter() - start)
                cached.append(result.cached_tokens)
                out["prompt_tokens_first_call"] = out["prompt_tokens_first_call"] or result.prompt_tokens
                answers.append(result.text)
        finally:
            lm.close()
        answers_by[name] = answers
        later = statistics.mean(seconds[1:]) / seconds[0] if calls > 1 else None
        out[name] = {
            "calls_s": [round(s, 3) for s in seconds],
            "cached_tokens": cached,
            "later_over_first": None if later is None else round(later, 3),
        }
        log(f"agent_loop {name}: calls {out[name]['calls_s']} s, cached {cached}, later/first {later}")
    out["same_answers"] = answers_by["cache_on"] == answers_by["cache_off"]
    out["targets_met"] = {"cache_on_later_over_first<=0.25": (out["cache_on"]["later_over_first"] or 1) <= 0.25}
    return out
