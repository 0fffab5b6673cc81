"""Runs per-tensor rule generators in lock-step rounds, batching their requests by kind."""
from __future__ import annotations

from typing import Any, Generator, Sequence

from mgup_dist.ops.base import TensorOps
from mgup_dist.rules.requests import Orthogonalize, Request, TensorSum, TopKMask

Rule = Generator[Request, Any, None]

_RESOLVERS = (
    (TensorSum, "tensor_sums"),
    (TopKMask, "topk_masks"),
    (Orthogonalize, "orthogonalize"),
)


def _advance(rule: Rule, answer: Any) -> Request | None:
    try:
        return rule.send(answer)
    except StopIteration:
        return None


def _resolve(request: Request, ops: TensorOps) -> Any:
    for kind, method in _RESOLVERS:
        if isinstance(request, kind):
            return getattr(ops, method)([request])[0]
    raise TypeError(f"rules yielded unknown request kinds: {[type(request).__name__]}")


def run_one(rule: Rule, ops: TensorOps) -> None:
    """Drive one rule to completion, resolving each request as it comes (a batch of one)."""
    request = _advance(rule, None)
    while request is not None:
        request = _advance(rule, _resolve(request, ops))


def run_rules(rules: Sequence[Rule], ops: TensorOps, lockstep: bool = True) -> None:
    """Drive ``rules`` to completion.

    ``lockstep`` (needed whenever ``ops`` communicates): each round collects the pending request of every
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
    pending: list[tuple[Rule, Request]] = []
    for rule in rules:
        request = _advance(rule, None)
        if request is not None:
            pending.append((rule, request))
    while pending:
        answers: dict[int, Any] = {}
        for kind, method in _RESOLVERS:
            batch = [(i, req) for i, (_, req) in enumerate(pending) if isinstance(req, kind)]
            if batch:
                results = getattr(ops, method)([req for _, req in batch])
                answers.update((i, res) for (i, _), res in zip(batch, results))
        if len(answers) != len(pending):
            unknown = {type(req).__name__ for _, req in pending} - {k.__name__ for k, _ in _RESOLVERS}
            raise TypeError(f"rules yielded unknown request kinds: {sorted(unknown)}")
        following = []
        for i, (rule, _) in enumerate(pending):
            request = _advance(rule, answers[i])
            if request is not None:
                following.append((rule, request))
        pending = following
