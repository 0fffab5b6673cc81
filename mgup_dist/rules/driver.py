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


def run_rules(rules: Sequence[Rule], ops: TensorOps) -> None:
    """Drive ``rules`` to completion.

    Each round collects the pending request of every live rule, resolves all requests of one kind with a
    single call to ``ops`` (kinds in a fixed order), and sends each rule its answer. With identical rule
    lists on every rank, every rank makes identical ``ops`` calls.
    """
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
