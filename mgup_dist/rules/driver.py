"""Runs per-tensor rule generators in lock-step rounds, batching their requests by kind.

A rule yields one `Request`, or a tuple of requests that do not depend on each other's answers (answered with
a tuple, in the same order): those are resolved in the same round, so a collective one can be in flight while
the ops compute another (MGUP-Muon's mask verdict during Newton–Schulz).
"""
from __future__ import annotations

from typing import Any, Generator, Sequence, Union

from mgup_dist.ops.base import TensorOps
from mgup_dist.rules.requests import Orthogonalize, Request, TensorSum, TopKMask

Ask = Union[Request, tuple[Request, ...]]
Rule = Generator[Ask, Any, None]

_RESOLVERS = (
    (TensorSum, "tensor_sums"),
    (TopKMask, "topk_masks"),
    (Orthogonalize, "orthogonalize"),
)


def _advance(rule: Rule, answer: Any) -> Ask | None:
    try:
        return rule.send(answer)
    except StopIteration:
        return None


def _answer_round(asks: Sequence[Ask], ops: TensorOps) -> list[Any]:
    """The answers to one round's ``asks`` (one per rule): every request of a kind goes to ``ops`` in one call,
    kinds in a fixed order, then ``ops.settle()`` (pending verdicts, e.g. non-finite mask scores, raise here:
    before any rule sees an answer)."""
    flat = [(i, j, request) for i, ask in enumerate(asks)
            for j, request in enumerate(ask if isinstance(ask, tuple) else (ask,))]
    answers: dict[tuple[int, int], Any] = {}
    for kind, method in _RESOLVERS:
        batch = [(i, j, request) for i, j, request in flat if isinstance(request, kind)]
        if batch:
            results = getattr(ops, method)([request for _, _, request in batch])
            answers.update(((i, j), result) for (i, j, _), result in zip(batch, results))
    if len(answers) != len(flat):
        unknown = {type(r).__name__ for _, _, r in flat} - {kind.__name__ for kind, _ in _RESOLVERS}
        raise TypeError(f"rules yielded unknown request kinds: {sorted(unknown)}")
    ops.settle()
    return [
        tuple(answers[i, j] for j in range(len(ask))) if isinstance(ask, tuple) else answers[i, 0]
        for i, ask in enumerate(asks)
    ]


def run_one(rule: Rule, ops: TensorOps) -> None:
    """Drive one rule to completion, resolving each request as it comes (a round of one rule)."""
    ask = _advance(rule, None)
    while ask is not None:
        ask = _advance(rule, _answer_round([ask], ops)[0])


def run_rules(rules: Sequence[Rule], ops: TensorOps, lockstep: bool = True) -> None:
    """Drive ``rules`` to completion.

    ``lockstep`` (needed whenever ``ops`` communicates): each round collects the pending requests of every
    live rule, resolves all requests of one kind with a single call to ``ops`` (kinds in a fixed order), and
    sends each rule its answer. With identical rule lists on every rank, every rank makes identical ``ops``
    calls. Otherwise (a single process): the rules run one after another, each to completion (`run_one`), so
    only one tensor's temporaries are alive at a time and scratch space can be shared between tensors. The
    results are the same either way: a rule touches only its own tensor, and answers do not depend on batching.
    """
    if not lockstep:
        for rule in rules:
            run_one(rule, ops)
        return
    pending = [(rule, ask) for rule in rules if (ask := _advance(rule, None)) is not None]
    while pending:
        answers = _answer_round([ask for _, ask in pending], ops)
        pending = [(rule, ask) for (rule, _), answer in zip(pending, answers)
                   if (ask := _advance(rule, answer)) is not None]
