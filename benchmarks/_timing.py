"""Timing shared by the benchmark scripts."""

import time


def best_time(fn, repeat: int = 1):
    """(best wall time over ``repeat`` runs, result of the last run)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
