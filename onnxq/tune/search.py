"""The fallback search over ranked units: the shortest passing prefix, then pruned."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen fallback set (node keys), its score, and whether it met the target."""

    keep_float: frozenset[str]
    score: float
    met: bool
    trials: int


def search_fallback(
    ranked: Sequence[frozenset[str]],
    base: frozenset[str],
    sensitivity: dict[str, float],
    score: Callable[[frozenset[str]], float],
    accept: Callable[[float], bool],
    max_trials: int,
) -> SearchResult:
    """A small set of nodes that, kept float beside ``base``, makes ``accept(score(...))`` true:
    the shortest passing prefix of ``ranked`` (node sets, most sensitive first), then pruned:
    chunks of its units, least sensitive first and halving in size, are re-quantized where the
    metric allows, and finally single nodes, least ``sensitivity`` first."""
    trials = 0

    def ok(nodes: frozenset[str]) -> tuple[bool, float]:
        nonlocal trials
        trials += 1
        value = score(base | nodes)
        return accept(value), value

    def union(units: Sequence[frozenset[str]]) -> frozenset[str]:
        return frozenset().union(*units)

    good, value = ok(frozenset())
    if good or not ranked:
        return SearchResult(base, value, good, trials)
    low, high = 0, 1
    while True:
        high = min(high, len(ranked))
        good, value = ok(union(ranked[:high]))
        if good or high == len(ranked):
            break
        low, high = high, high * 2
    if not good:
        return SearchResult(base | union(ranked), value, False, trials)
    best_value = value
    while high - low > 1 and trials < max_trials:
        middle = (low + high) // 2
        good, value = ok(union(ranked[:middle]))
        if good:
            high, best_value = middle, value
        else:
            low = middle
    kept = list(ranked[:high])
    chunk = len(kept) // 2
    while chunk >= 1 and trials < max_trials:
        start = len(kept) - chunk  # the least sensitive units are at the end
        while start >= 0 and len(kept) > chunk and trials < max_trials:
            trial = kept[:start] + kept[start + chunk :]
            good, value = ok(union(trial))
            if good:
                kept, best_value = trial, value
            start -= chunk
        chunk //= 2
    chosen = union(kept)
    for key in sorted(chosen, key=lambda k: (sensitivity.get(k, 0.0), k)):
        if trials >= max_trials or len(chosen) == 1:
            break
        good, value = ok(chosen - {key})
        if good:
            chosen, best_value = chosen - {key}, value
    return SearchResult(base | chosen, best_value, True, trials)
