"""The fallback search scoring trials ahead on several slots: the same trials, in the same order,
and the same chosen set as one slot, on generated rankings and score functions (pure Python)."""

from __future__ import annotations

import zlib

from hypothesis import given, strategies as st

from onnxq.tune.search import Lookahead, search_fallback


class _Scorer:
    """A deterministic score (``weights`` of the nodes kept float, plus a pseudo-random term of
    amplitude ``noise`` that makes verdicts non-monotonic), the trials consumed in order, and the
    rounds of trials scored ahead."""

    def __init__(self, weights: dict[str, float], noise: float) -> None:
        self.weights, self.noise = weights, noise
        self.consumed: list[frozenset[str]] = []
        self.rounds: list[list[frozenset[str]]] = []
        self.ahead: dict[frozenset[str], float] = {}

    def value(self, keys: frozenset[str]) -> float:
        jitter = zlib.crc32(",".join(sorted(keys)).encode()) / 2**32 - 0.5
        return sum(self.weights.get(key, 0.0) for key in keys) + self.noise * jitter

    def score(self, keys: frozenset[str]) -> float:
        self.consumed.append(keys)
        return self.ahead.pop(keys) if keys in self.ahead else self.value(keys)

    def prefetch(self, keysets: list[frozenset[str]]) -> None:
        self.rounds.append(keysets)
        self.ahead.update((keys, self.value(keys)) for keys in keysets)


def _search(ranked, base, sensitivity, scorer: _Scorer, threshold: float, max_trials: int, slots: int):
    lookahead = Lookahead(slots, lambda keys: keys in scorer.ahead, scorer.prefetch) if slots > 1 else None
    return search_fallback(ranked, base, sensitivity, scorer.score, lambda value: value >= threshold, max_trials,
                           lookahead)


@st.composite
def searches(draw):
    """Ranked units over up to 24 nodes (units of 1 to 3 nodes, possibly overlapping), node
    weights and sensitivities, a threshold somewhere in the range of the scores, a noise level,
    a base set and a trial limit."""
    nodes = [f"n{i}" for i in range(draw(st.integers(1, 24)))]
    units = draw(st.lists(st.lists(st.sampled_from(nodes), min_size=1, max_size=3).map(frozenset), max_size=30))
    weights = {node: draw(st.floats(0, 1)) for node in nodes}
    sensitivity = {node: draw(st.floats(-1, 1)) for node in nodes if draw(st.booleans())}
    threshold = draw(st.floats(-0.5, 1.2)) * sum(weights.values())
    base = frozenset(draw(st.lists(st.sampled_from(["b0", "b1"]), max_size=2)))
    return units, base, sensitivity, weights, threshold, draw(st.sampled_from([0.0, 0.3, 3.0])), draw(st.integers(1, 80))


@given(searches())
def test_every_slot_count_consumes_the_trials_of_one_slot_in_its_order(search):
    units, base, sensitivity, weights, threshold, noise, max_trials = search
    one = _Scorer(weights, noise)
    expected = _search(units, base, sensitivity, one, threshold, max_trials, slots=1)
    assert not one.rounds and expected.trials == len(one.consumed) <= max(max_trials, 1 + len(units))
    for slots in (2, 3, 4):
        scorer = _Scorer(weights, noise)
        assert _search(units, base, sensitivity, scorer, threshold, max_trials, slots) == expected, slots
        assert scorer.consumed == one.consumed, slots
        # each round starts with the next trial, holds at most `slots` new ones, and no round is wasted on
        # trials already at hand: every consumed trial was scored ahead, in fewer rounds than trials
        assert all(1 <= len(keysets) == len(set(keysets)) <= slots for keysets in scorer.rounds)
        assert len(scorer.rounds) <= len(scorer.consumed)


def test_scoring_ahead_halves_the_rounds_of_a_long_search():
    nodes = [f"n{i}" for i in range(64)]
    ranked = [frozenset({node}) for node in nodes]
    needed = {"n0", "n9", "n40"}  # a long doubling phase, a bisection, then pruning

    def rounds(slots: int) -> tuple[int, list[frozenset[str]]]:
        scorer = _Scorer({node: 1.0 for node in needed}, 0.0)
        result = _search(ranked, frozenset(), {}, scorer, 3.0, 64, slots)
        assert result.met and result.keep_float == frozenset(needed)
        return (len(scorer.rounds) if slots > 1 else len(scorer.consumed)), scorer.consumed

    one_slot, consumed = rounds(1)
    for slots in (3, 4):
        ahead, same = rounds(slots)
        assert same == consumed and ahead <= one_slot / 2, (slots, ahead, one_slot)
