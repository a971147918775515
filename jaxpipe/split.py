"""Optimal contiguous splits: minimise the slowest part's cost (a min-max dynamic programme).

`min_max_split` splits items 0..N-1 into P contiguous parts of sizes in [min_size, max_size]
minimising the largest `cost(p, starts, ends)` (numpy, broadcast over `starts` [K, 1] and
`ends` [1, J]), where a cost of
`inf` marks a part that does not fit (e.g. in memory). Among splits with the optimal
bottleneck it returns the one with the smallest sum of squared part costs, which balances the
non-bottleneck parts too. Exact, O(P * N^2) with numpy over all (start, end) pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxpipe.config import ConfigError
from jaxpipe.layout import StageLayout

CostFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (part, starts, ends) -> cost


def _dp(N: int, P: int, cost: CostFn, lo: int, hi: int, combine, bound: float):
    """best[p][j]: the optimum over the first p + 1 parts covering items [0, j). Each part p is
    one numpy step over every (start, end) pair at once."""
    best = np.full((P, N + 1), np.inf)
    arg = np.zeros((P, N + 1), np.int64)
    starts, ends = np.arange(N + 1)[:, None], np.arange(N + 1)[None, :]
    size = ends - starts
    cols = np.arange(N + 1)
    for p in range(P):
        ok = (size >= lo) & (size <= hi) & (starts >= lo * p)
        ok &= (ends >= lo * (p + 1)) & (ends <= N - lo * (P - p - 1))
        if p == 0:
            ok &= starts == 0
        c = np.broadcast_to(np.asarray(cost(p, starts, ends), np.float64), ok.shape)
        c = np.where(ok & (c <= bound), c, np.inf)
        prev = np.zeros((N + 1, 1)) if p == 0 else best[p - 1][:, None]
        total = np.where(ok, combine(prev, c), np.inf)
        k = np.argmin(total, axis=0)  # the smallest start among equals
        best[p], arg[p] = total[k, cols], k
    return best, arg


def _unwind(arg: np.ndarray, N: int, P: int) -> list[int]:
    sizes, j = [], N
    for p in range(P - 1, -1, -1):
        i = int(arg[p, j])
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def min_max_split(
    num_items: int,
    num_parts: int,
    cost: CostFn,
    min_size: int = 1,
    max_size: int | None = None,
) -> tuple[list[int], float]:
    """Part sizes and the optimal bottleneck; raises ConfigError when no split is feasible."""
    N, P = num_items, num_parts
    hi = N if max_size is None else max_size
    if P < 1 or N < P * min_size or N > P * hi:
        raise ConfigError(f"cannot split {N} layers into {P} parts of {min_size}..{hi} layers each")
    best, _ = _dp(N, P, cost, min_size, hi, np.maximum, np.inf)
    bottleneck = float(best[P - 1, N])
    if not np.isfinite(bottleneck):
        raise ConfigError(f"no split of {N} layers into {P} parts fits")
    bound = bottleneck * (1 + 1e-9) + 1e-300
    sq, arg = _dp(N, P, lambda p, s, e: cost(p, s, e), min_size, hi, lambda a, c: a + c * c, bound)
    return _unwind(arg, N, P), bottleneck


def uniform_sizes(num_items: int, num_parts: int) -> list[int]:
    """Equal sizes, the remainder one each to the middle parts; never an empty part."""
    return list(StageLayout.uniform(num_items, num_parts).layer_counts)


def spread(total: int, parts: int, heavy_first: bool) -> list[int]:
    """`total` layers over `parts` repeats as evenly as possible (extras first or last)."""
    base, extra = divmod(total, parts)
    sizes = [base + (i < extra) for i in range(parts)]
    return sizes if heavy_first else sizes[::-1]
