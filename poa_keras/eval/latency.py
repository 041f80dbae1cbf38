"""Latency of many models measured together: interleaved rounds, a robust statistic with its
spread, and a check that no bigger model is reported faster than a smaller one.

    stats = measure_interleaved({"a": call_a, "b": call_b}, rounds=10, warmup=2)
    stats["a"].median, stats["a"].spread        # seconds: the median and the IQR of the rounds
    inversions(stats, dominates)                # pairs (big, small) with big faster beyond noise

Why interleaved: timing one model after another (all runs of A, then all runs of B) puts any
drift of the machine -- a background job, the CPU clock, a cache or thread pool warming up --
between the models, so it can invert sizes (a 3.3 MFLOPs subnet timed at 12.3 ms and a 12 MFLOPs
one at 8.7 ms in one sweep). Here every round times every model once, in an order shuffled per
round (seeded), after ``warmup`` untimed calls of each; drift then hits all models alike and
shows up as spread instead of as a difference.

Statistic: the median over the rounds; spread: the interquartile range (q3 - q1) of the
rounds. A difference between two models is "beyond the spread" when it exceeds the larger of
their two spreads.

Sizes: ``dominates(a, b)`` says that model a is at least as big as b in every dimension (a
subnet at least as wide AND as deep) and not equal. ``inversions`` lists the pairs where the
bigger one is faster beyond the spread; ``measure_interleaved(..., dominates=...,
max_rounds=...)`` re-measures the models of such pairs in further interleaved rounds (up to
``max_rounds`` in all) before it gives up, and what remains is reported (never hidden): the
caller warns and records it. A remaining inversion can be real (a width that suits the
hardware's vector length better), so it is not "corrected".
"""
from __future__ import annotations

import dataclasses
import random
import statistics
import time
from typing import NamedTuple


class LatencyStats(NamedTuple):
    """Seconds over the timed rounds of one model."""

    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def spread(self):
        """The interquartile range q3 - q1."""
        return self.q3 - self.q1


def summarize(times):
    """LatencyStats of a list of seconds (quartiles by linear interpolation; one time: all
    equal)."""
    times = sorted(float(t) for t in times)
    if not times:
        raise ValueError("no timed rounds to summarize")
    if len(times) == 1:
        return LatencyStats(times[0], times[0], times[0], 1)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return LatencyStats(median, q1, q3, len(times))


def beyond_spread(fast, slow):
    """Whether ``fast`` (LatencyStats) is faster than ``slow`` by more than the larger of their
    spreads."""
    return slow.median - fast.median > max(fast.spread, slow.spread)


def spec_dominates(a, b):
    """Subnet spec ``a`` is at least as big as ``b`` in every field (a tuple field, such as a
    ResNet's stage depths, elementwise) and not equal: as wide AND as deep. Specs of different
    classes are not compared."""
    if type(a) is not type(b) or a == b or not dataclasses.is_dataclass(a):
        return False
    for field in dataclasses.fields(a):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        va, vb = (va, vb) if isinstance(va, tuple) else ((va,), (vb,))
        if len(va) != len(vb) or any(x < y for x, y in zip(va, vb)):
            return False
    return True


def inversions(stats, dominates):
    """Pairs (big, small) of keys of ``stats`` where ``dominates(big, small)`` and ``big`` is
    reported faster than ``small`` beyond the spread."""
    keys = list(stats)
    return [(a, b) for a in keys for b in keys
            if a != b and dominates(a, b) and beyond_spread(stats[a], stats[b])]


def measure_interleaved(calls, rounds=10, warmup=2, dominates=None, max_rounds=None, seed=0,
                        clock=time.perf_counter, progress=None):
    """Times every callable of ``calls`` (a dict key -> zero-argument callable that returns when
    its work is done) in interleaved rounds.

    Args:
      calls: the models to time; each call must synchronise (e.g. copy its output to the host).
      rounds: timed rounds (each calls every model once, in a shuffled order).
      warmup: untimed calls of every model first (compilation, allocator warm-up).
      dominates: ``dominates(a, b)`` for keys: a is at least as big as b. With it, the models of
        an inverted pair (``inversions``) get further rounds, up to ``max_rounds`` in all.
      max_rounds: the most rounds a model gets (default 3 x rounds).
      seed: of the per-round shuffles.
      clock: seconds (``time.perf_counter``); injectable for tests.
      progress: called with no argument after every call (a progress bar's step), or None.

    Returns:
      (stats, remaining): ``{key: LatencyStats}`` and the inversions left after re-measuring.
    """
    if not calls:
        raise ValueError("calls is empty: nothing to time")
    if int(rounds) < 1 or int(warmup) < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, "
                         f"warmup={warmup}")
    max_rounds = 3 * int(rounds) if max_rounds is None else int(max_rounds)
    if max_rounds < rounds:
        raise ValueError(f"max_rounds must be >= rounds={rounds}, got {max_rounds}")
    rng = random.Random(seed)
    keys = list(calls)
    for _ in range(int(warmup)):
        for key in keys:
            calls[key]()
            if progress:
                progress()
    times = {key: [] for key in keys}

    def one_round(subset):
        order = list(subset)
        rng.shuffle(order)
        for key in order:
            start = clock()
            calls[key]()
            times[key].append(clock() - start)
            if progress:
                progress()

    for _ in range(int(rounds)):
        one_round(keys)
    stats = {key: summarize(t) for key, t in times.items()}
    remaining = inversions(stats, dominates) if dominates is not None else []
    done = int(rounds)
    while remaining and done < max_rounds:
        involved = list(dict.fromkeys(k for pair in remaining for k in pair))
        for _ in range(min(int(rounds), max_rounds - done)):
            one_round(involved)
        done += min(int(rounds), max_rounds - done)
        stats = {key: summarize(t) for key, t in times.items()}
        remaining = inversions(stats, dominates)
    return stats, remaining
