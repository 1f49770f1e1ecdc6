"""How many consecutive blocks each pipeline chunk gets: plain arithmetic, shared by the stage
code (``plait.pipeline.stage``) and the planner, which calls it for every layout it prices."""
from __future__ import annotations

from plait.errors import PlaitError


class StageError(PlaitError):
    """A pipeline split that cannot work; one line."""


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Block counts of ``parts`` contiguous groups minimising the most expensive group.

    Dynamic programme over (groups, blocks). For the last group's start j of the first i
    blocks, max(best[k-1][j], cost(j..i)) is the max of a non-decreasing and a decreasing
    function of j (costs are positive), so its minimum sits where they cross: a binary search
    finds it, O(parts n log n) instead of O(parts n^2) (the planner calls this often). Ties
    go to the earliest start.
    """
    n = len(costs)
    if parts > n:
        raise StageError(f"cannot split {n} layers into {parts} pipeline chunks")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[k][i]: minimal max-cost of splitting the first i blocks into k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        previous = best[k - 1]
        for i in range(k, n + 1):
            low, high = k - 1, i  # first j in [k-1, i) with previous[j] >= cost(j..i), else i
            while low < high:
                middle = (low + high) // 2
                if previous[middle] >= prefix[i] - prefix[middle]:
                    high = middle
                else:
                    low = middle + 1
            crossing = low
            candidates = [j for j in (crossing - 1, crossing) if k - 1 <= j < i]
            for j in candidates:
                value = max(previous[j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]
