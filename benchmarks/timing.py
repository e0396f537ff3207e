"""Timing helpers shared by the benchmark scripts: warm-up, repeats, median wall time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs.

    JAX results are waited for (``block_until_ready``) so asynchronous dispatch is timed honestly.
    """
    return interleaved_median_seconds([fn], repeats=repeats, warmup=warmup)[0]


def first_call_seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn()``, waited for: on a fresh jitted function, compilation
    plus one run (subtract a warm median for the compile time alone)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved_median_seconds(
    fns: list[Callable[[], object]], *, repeats: int = 5, warmup: int = 1
) -> list[float]:
    """Median wall time of each ``fns[i]()``, timing them in turn within every repeat.

    Alternating the contenders spreads a noisy machine's slow spells over all of them, so their
    ratio is steadier than when each is timed in its own block.
    """
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def print_table(title: str, rows: list[tuple[str, float, str]]) -> None:
    """Prints ``(name, seconds, note)`` rows as a fixed-width table."""
    print(f"\n{title}")
    print(f"  {'what':<58} {'ms':>10}  note")
    for name, seconds, note in rows:
        print(f"  {name:<58} {seconds * 1e3:>10.2f}  {note}")
