"""The clock that times a run's sweeps.

Epoch seconds, plus every part of a sleep the engine asked for that did not pass: a patched ``time.sleep``
(as openeo's own tests patch it) returns at once, and the run must then behave as if it had slept, as
upstream's loop does, rather than wait for ``poll_sleep`` of real time between two sweeps. A real sleep
adds nothing, so outside such tests the clock is ``time.time``.
"""

from __future__ import annotations

import time


class RunClock:
    """``now()`` in epoch seconds, ahead of ``time.time()`` by what sleeps skipped (``slept``)."""

    def __init__(self) -> None:
        self._skipped = 0.0

    def now(self) -> float:
        return time.time() + self._skipped

    def sleep(self, seconds: float) -> None:
        """``time.sleep(seconds)`` (looked up now, so patches and time machines apply), counted as slept."""
        began = time.time()
        time.sleep(seconds)
        self._skipped += max(0.0, seconds - (time.time() - began))
