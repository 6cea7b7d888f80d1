"""Paired measurements in fresh processes: the two sides of a comparison, each trained in a newly
spawned interpreter, back to back, the order alternating from round to round.

A step time taken late in a long benchmark process depends on what ran before it in that process
(the heap's state, Dynamo's caches, the threads' placement): the main benchmark's in-process ratio
of our dense model to the GPT-2-style reference moved from 0.90 to 0.75 between two runs in which
neither model changed. A fresh process per side removes that history; running the pair back to
back lets foreign load hit both alike; alternating which side runs first cancels the order effect
(the second process of a pair is often slower) in the mean, at the cost of a wider interval.

Imports: multiprocessing only (a side imports torch in its own process).
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable, Sequence

#: one side of a comparison: a module-level (picklable) function and its arguments
Side = tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]


def run_in_fresh_process(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> dict[str, Any]:
    """``fn(*args)`` in a newly spawned interpreter (spawn, not fork: fork would inherit this heap)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def paired_rounds(pairs: Sequence[tuple[Side, Side]], rounds: int,
                  log: Callable[[str], None] = lambda msg: None) -> list[list[tuple[dict[str, Any], dict[str, Any]]]]:
    """``rounds`` rounds over every pair (a, b): a and b each in a fresh process, back to back, a
    first in even rounds and b first in odd ones. Returns, per pair, one (a's result, b's result)
    per round."""
    out: list[list[tuple[dict[str, Any], dict[str, Any]]]] = [[] for _ in pairs]
    for rnd in range(rounds):
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(pairs):
            first, second = (a, b) if rnd % 2 == 0 else (b, a)
            r_first = run_in_fresh_process(*first)
            r_second = run_in_fresh_process(*second)
            out[i].append((r_first, r_second) if rnd % 2 == 0 else (r_second, r_first))
        log(f"round {rnd + 1}/{rounds}: {time.perf_counter() - t0:.1f}s")
    return out
