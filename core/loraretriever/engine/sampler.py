"""Choosing each row's next token from the step's logits, across the rows at once.

Repetition penalties, grammar masks, temperature and top-p are tensor operations over every row
that asks for them (vLLM's sampler does the same), so a step costs a few kernels, not a Python
loop over the vocabulary per row. Only the draw is per row: each request samples from its own
seeded generator, so the same seed gives the same text in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from loraretriever.engine.constraints import Grammars
from loraretriever.engine.requests import RequestError, RequestState

__all__ = ["Sampled", "Sampler"]


@dataclass(frozen=True)
class Sampled:
    """A step's choice: each row's token (a tensor for the next step's input, and as ints), and
    whether its logits were finite (a row that is not must fail)."""

    tokens: torch.Tensor
    ids: list[int]
    finite: list[bool]


class Sampler:
    """Chooses tokens for a batch of requests, each under its own settings.

    Args:
        grammars: Builds and applies the grammar masks of constrained rows.
    """

    def __init__(self, grammars: Grammars) -> None:
        self.grammars = grammars

    def __call__(self, requests: Sequence[RequestState], logits: torch.Tensor) -> Sampled:
        """The next token of every row (``logits`` is ``(rows, vocab)``, changed in place). A row
        whose grammar refuses its token fails here, alone."""
        # NaN and +inf reach a row's maximum: one reduction, not a full-vocabulary isfinite mask
        finite = torch.isfinite(logits.amax(dim=-1)).tolist()
        penalized = [row for row, r in enumerate(requests) if r.config.repetition_penalty != 1.0]
        if penalized:
            _penalize_repeats(logits, penalized, requests)
        constrained = [(row, r.matcher) for row, r in enumerate(requests) if r.matcher is not None]
        if constrained:
            self.grammars.mask(logits, [row for row, _ in constrained], [m for _, m in constrained])
        chosen = logits.argmax(dim=-1)
        sampled = [row for row, r in enumerate(requests) if r.config.temperature > 0 and finite[row]]
        if sampled:
            probs = _probabilities(logits, sampled, requests)
            for i, row in enumerate(sampled):
                chosen[row] = torch.multinomial(probs[i], 1, generator=requests[row].rng)[0]
        ids = chosen.tolist()
        for row, matcher in constrained:
            if finite[row] and not matcher.consume_token(ids[row]):
                requests[row].fail(RequestError(f"the grammar refused token {ids[row]}: {matcher.get_error()}"))
        return Sampled(chosen, ids, finite)


def _penalize_repeats(logits: torch.Tensor, rows: list[int], requests: Sequence[RequestState]) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor on ``rows``, in place: a seen token's logit is
    divided by the row's penalty when positive, multiplied when negative. The rows' seen tokens
    are one padded index (padded with a seen token, whose repeat writes the same value)."""
    device = logits.device
    seen = [torch.tensor(sorted(set(requests[r].prompt_ids + requests[r].ids)), device=device) for r in rows]
    index = pad_sequence(seen, batch_first=True, padding_value=-1)
    index = torch.where(index < 0, index[:, :1], index)
    where = torch.tensor(rows, device=device)
    penalty = torch.tensor([requests[r].config.repetition_penalty for r in rows], device=device)
    penalty = penalty.float()[:, None]
    picked = logits.index_select(0, where)
    values = picked.gather(1, index)
    wide = values.float()  # as a Python-number penalty is applied: in float32, rounded once to the logits' dtype
    picked.scatter_(1, index, torch.where(wide > 0, wide / penalty, wide * penalty).to(values.dtype))
    logits.index_copy_(0, where, picked)


def _probabilities(logits: torch.Tensor, rows: list[int], requests: Sequence[RequestState]) -> torch.Tensor:
    """The sampling distribution of ``rows``: softmax at each row's temperature, cut to its top-p
    nucleus (the smallest prefix of tokens whose mass reaches ``top_p``, always the top token)."""
    device = logits.device
    configs = [requests[r].config for r in rows]
    temperature = torch.tensor([c.temperature for c in configs], device=device, dtype=torch.float32)[:, None]
    probs = torch.softmax(logits.index_select(0, torch.tensor(rows, device=device)).float() / temperature, dim=-1)
    if any(c.top_p < 1.0 for c in configs):
        # rows without top-p keep every token (an infinite threshold), not a rounding-dependent cut
        top_p = torch.tensor([c.top_p if c.top_p < 1.0 else float("inf") for c in configs], device=device)[:, None]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs
