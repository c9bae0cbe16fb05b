"""Delays for retrying: exponential, capped, with jitter."""

from __future__ import annotations

import random


def delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first).

    The nominal delay is ``min(base * 2**(attempt-1), cap)``; the result is
    drawn from its upper half ("equal jitter"), so retries of many clients
    that failed together spread out, yet never come sooner than half the
    nominal delay.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    nominal = min(base * 2 ** min(attempt - 1, 64), cap)
    return nominal / 2 + (rng or random).uniform(0, nominal / 2)
