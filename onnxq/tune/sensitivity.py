"""Ranking fallback units by sensitivity, in groups first where there are many."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def rank_units(
    units: Sequence[tuple[str, ...]],
    gain_of: Callable[[frozenset[str]], float],
    individually: int = 64,
    refine: int = 6,
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, ...], float]:
    """Sensitivity of each unit: ``gain_of(nodes)`` is the error removed by keeping ``nodes``
    float. Up to ``individually`` units are measured one by one; more are measured in about
    sqrt(n) contiguous groups first (neighbouring units in graph order), and only the units of
    the ``refine`` groups with the largest gains are then measured one by one; the others share
    their group's gain evenly. Returns gains in ranking order, largest first."""
    total = len(units) if len(units) <= individually else None
    done = 0

    def measure(nodes: frozenset[str]) -> float:
        nonlocal done
        gain = gain_of(nodes)
        done += 1
        if progress is not None:
            progress(done, total or done)
        return gain

    if len(units) <= individually:
        gains = {unit: measure(frozenset(unit)) for unit in units}
    else:
        size = max(1, round(len(units) ** 0.5))
        groups = [tuple(units[i : i + size]) for i in range(0, len(units), size)]
        total = len(groups) + refine * size
        group_gains = {group: measure(frozenset().union(*group)) for group in groups}
        ordered = sorted(groups, key=lambda g: -group_gains[g])
        gains = {}
        for group in ordered[:refine]:
            gains.update((unit, measure(frozenset(unit))) for unit in group)
        for group in ordered[refine:]:
            gains.update((unit, group_gains[group] / len(group)) for unit in group)
    return dict(sorted(gains.items(), key=lambda item: -item[1]))
