"""The fallback search over ranked units: the shortest passing prefix, then pruned; with several
slots, the trials it may need next are scored ahead, in parallel.

Rules:
1. The search is one sequential algorithm (``_proposals``): it proposes a node set, is told
   whether it passed, and proposes the next; what it proposes depends on those verdicts alone.
2. It consumes the verdicts in that order, and only consumed trials count against
   ``max_trials``; so the chosen set and the sequence of trials are the same for any number of
   slots.
3. With a ``Lookahead`` of ``slots`` > 1, when the next proposal has no result at hand, the
   proposals that may follow it are found by replaying the algorithm on the verdicts so far
   followed by assumed ones, the likeliest first (a pass is as likely as the share of passes
   among the phase's consumed trials, add-one smoothed), and up to ``slots`` of them without a
   result are scored at once.
4. A result scored ahead that the algorithm never proposes is never consumed: it changes nothing.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Generator, Sequence

_EXPLORED_PER_SLOT = 8  # proposals replayed per slot at most, when looking ahead (rule 3)

# yields (nodes kept float beside the base, phase), is sent the verdict; returns (chosen nodes, met)
Proposals = Generator[tuple[frozenset[str], str], bool, tuple[frozenset[str], bool]]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen fallback set (node keys), its score, and whether it met the target."""

    keep_float: frozenset[str]
    score: float
    met: bool
    trials: int


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """Scoring ahead of the search (rule 3): ``slots`` node sets at a time; ``known(keys)``:
    whether a result for ``keys`` is at hand; ``prefetch(keysets)``: score them now, together,
    keeping the results for when the search consumes them (through ``score``)."""

    slots: int
    known: Callable[[frozenset[str]], bool]
    prefetch: Callable[[list[frozenset[str]]], None]


def search_fallback(
    ranked: Sequence[frozenset[str]],
    base: frozenset[str],
    sensitivity: dict[str, float],
    score: Callable[[frozenset[str]], float],
    accept: Callable[[float], bool],
    max_trials: int,
    lookahead: Lookahead | None = None,
) -> SearchResult:
    """A small set of nodes that, kept float beside ``base``, makes ``accept(score(...))`` true:
    the shortest passing prefix of ``ranked`` (node sets, most sensitive first), then pruned:
    chunks of its units, least sensitive first and halving in size, are re-quantized where the
    metric allows, and finally single nodes, least ``sensitivity`` first. ``score`` is called
    once per trial, in the algorithm's order; ``lookahead`` scores likely next trials ahead."""
    verdicts: list[bool] = []
    values: dict[frozenset[str], float] = {}
    passes: dict[str, list[int]] = {}  # phase: [passes, trials] among consumed trials
    search = _proposals(ranked, sensitivity, max_trials)
    try:
        nodes, phase = next(search)
        while True:
            if lookahead is not None and lookahead.slots > 1 and not lookahead.known(base | nodes):
                lookahead.prefetch(_ahead(ranked, sensitivity, max_trials, verdicts, base, passes, lookahead))
            values[nodes] = score(base | nodes)
            verdicts.append(accept(values[nodes]))
            counts = passes.setdefault(phase, [0, 0])
            counts[0], counts[1] = counts[0] + verdicts[-1], counts[1] + 1
            nodes, phase = search.send(verdicts[-1])
    except StopIteration as stop:
        chosen, met = stop.value
    return SearchResult(base | chosen, values[chosen], met, len(verdicts))


def _proposals(ranked: Sequence[frozenset[str]], sensitivity: dict[str, float], max_trials: int) -> Proposals:
    """The sequential search of ``search_fallback`` (rule 1)."""
    trials = 1

    def union(units: Sequence[frozenset[str]]) -> frozenset[str]:
        return frozenset().union(*units)

    good = yield frozenset(), "plain"
    if good or not ranked:
        return frozenset(), good
    low, high = 0, 1
    while True:
        high = min(high, len(ranked))
        trials += 1
        good = yield union(ranked[:high]), "grow"
        if good or high == len(ranked):
            break
        low, high = high, high * 2
    if not good:
        return union(ranked), False
    while high - low > 1 and trials < max_trials:
        middle = (low + high) // 2
        trials += 1
        if (yield union(ranked[:middle]), "narrow"):
            high = middle
        else:
            low = middle
    kept = list(ranked[:high])
    chunk = len(kept) // 2
    while chunk >= 1 and trials < max_trials:
        start = len(kept) - chunk  # the least sensitive units are at the end
        while start >= 0 and len(kept) > chunk and trials < max_trials:
            trial = kept[:start] + kept[start + chunk :]
            trials += 1
            if (yield union(trial), "prune units"):
                kept = trial
            start -= chunk
        chunk //= 2
    chosen = union(kept)
    for key in sorted(chosen, key=lambda k: (sensitivity.get(k, 0.0), k)):
        if trials >= max_trials or len(chosen) == 1:
            break
        trials += 1
        if (yield chosen - {key}, "prune nodes"):
            chosen = chosen - {key}
    return chosen, True


def _replay(ranked: Sequence[frozenset[str]], sensitivity: dict[str, float], max_trials: int,
            verdicts: Sequence[bool]) -> tuple[frozenset[str], str] | None:
    """What the search proposes after ``verdicts`` (``None``: it has ended)."""
    search = _proposals(ranked, sensitivity, max_trials)
    try:
        proposal = next(search)
        for good in verdicts:
            proposal = search.send(good)
    except StopIteration:
        return None
    return proposal


def _ahead(ranked: Sequence[frozenset[str]], sensitivity: dict[str, float], max_trials: int, verdicts: list[bool],
           base: frozenset[str], passes: dict[str, list[int]], lookahead: Lookahead) -> list[frozenset[str]]:
    """Up to ``lookahead.slots`` node sets (with ``base``) without a result that the search may
    propose next, the likeliest first; the first is its next proposal (rule 3)."""
    chosen: list[frozenset[str]] = []
    frontier: list[tuple[float, int, tuple[bool, ...]]] = [(-1.0, 0, ())]  # -likelihood, order, assumed verdicts
    order = 0
    for _ in range(_EXPLORED_PER_SLOT * lookahead.slots):
        if not frontier or len(chosen) == lookahead.slots:
            break
        minus_likelihood, _, assumed = heapq.heappop(frontier)
        proposal = _replay(ranked, sensitivity, max_trials, verdicts + list(assumed))
        if proposal is None:
            continue
        nodes, phase = proposal
        keys = base | nodes
        if keys not in chosen and not lookahead.known(keys):
            chosen.append(keys)
        passed, tried = passes.get(phase, (0, 0))
        p_pass = (passed + 1) / (tried + 2)
        for verdict, p in ((False, 1 - p_pass), (True, p_pass)):
            order += 1
            heapq.heappush(frontier, (minus_likelihood * p, order, (*assumed, verdict)))
    return chosen
