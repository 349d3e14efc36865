"""Ranking fallback units by sensitivity, in groups first where there are many."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def rank_units(
    units: Sequence[tuple[str, ...]],
    gains_of: Callable[[list[frozenset[str]]], list[float]],
    individually: int = 64,
    refine: int = 6,
    progress: Callable[[int, int], None] | None = None,
    step: int = 1,
) -> dict[tuple[str, ...], float]:
    """Sensitivity of each unit: ``gains_of([nodes, ...])`` are the errors removed by keeping
    each of the node sets float (measured together, so in parallel where there are workers). Up to ``individually`` units are measured one by one; more are measured in about
    sqrt(n) contiguous groups first (neighbouring units in graph order), and only the units of
    the ``refine`` groups with the largest gains are then measured one by one; the others share
    their group's gain evenly. Returns gains in ranking order, largest first. ``gains_of`` gets
    ``step`` node sets at a time (progress is reported after each call)."""
    total = len(units) if len(units) <= individually else None
    done = 0

    def measure(unit_sets: Sequence[Sequence[tuple[str, ...]]]) -> list[float]:
        nonlocal done
        gains: list[float] = []
        for start in range(0, len(unit_sets), step):
            chunk = unit_sets[start : start + step]
            gains += gains_of([frozenset().union(*unit_set) for unit_set in chunk])
            done += len(chunk)
            if progress is not None:
                progress(done, total or done)
        return gains

    if len(units) <= individually:
        gains = dict(zip(units, measure([[unit] for unit in units])))
    else:
        size = max(1, round(len(units) ** 0.5))
        groups = [tuple(units[i : i + size]) for i in range(0, len(units), size)]
        total = len(groups) + refine * size
        group_gains = dict(zip(groups, measure(groups)))
        ordered = sorted(groups, key=lambda g: -group_gains[g])
        refined = [unit for group in ordered[:refine] for unit in group]
        gains = dict(zip(refined, measure([[unit] for unit in refined])))
        for group in ordered[refine:]:
            gains.update((unit, group_gains[group] / len(group)) for unit in group)
    return dict(sorted(gains.items(), key=lambda item: -item[1]))
