"""The one timing rule of the benchmarks: one warm-up call, then the median of ``repeats`` calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5, sync: Callable[[], object] | None = None) -> float:
    """Median wall seconds of ``fn()``; ``sync`` (e.g. torch.cuda.synchronize) runs around each call."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
