"""What a run came to, in one line, and the flow run's final state that says it.

A run whose rows failed is still a run that did its work: its flow run ends ``Completed`` with a message
("7 of 10 rows ended in error"; finished jobs whose results were not downloaded are counted too: "all 12
rows finished, 9 results not downloaded"), the stats as its result. With a threshold (``fail_when_failed_rows``, a
count or a fraction of the rows), too many failed rows make it ``Failed`` with that message, so that
automations and retries can react; its result is then a ``TooManyFailedRows`` carrying the stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Row statuses that count as failed: the row ended without results.
FAILED_STATUSES = ("error", "start_failed", "canceled")
#: Download states of a finished row whose results are not (yet) where the user asked for them.
NOT_DOWNLOADED = ("pending", "failed", "gone")


class TooManyFailedRows(RuntimeError):
    """More rows failed than the flow run's ``fail_when_failed_rows`` allows; ``stats`` has the run stats."""

    def __init__(self, message: str, stats: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.stats = dict(stats or {})


@dataclass(frozen=True)
class RunOutcome:
    """Rows by status at the end of a run, and finished rows by the state of their result download."""

    histogram: Mapping[str, int]
    results: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.histogram.values())

    @property
    def failed(self) -> int:
        return sum(self.histogram.get(status, 0) for status in FAILED_STATUSES)

    @property
    def not_downloaded(self) -> int:
        return sum(self.results.get(state, 0) for state in NOT_DOWNLOADED)

    @property
    def message(self) -> str:
        """E.g. ``"7 of 10 rows ended in error"``, ``"3 of 10 rows failed (2 error, 1 canceled)"``, or
        ``"all 10 rows finished"``; then, if any, ``", 9 results not downloaded"``."""
        missing = self.not_downloaded
        return self._rows_message + (f", {missing} results not downloaded" if missing else "")

    @property
    def _rows_message(self) -> str:
        total, failed = self.total, self.failed
        if not failed:
            ended = {s: n for s, n in self.histogram.items() if n}
            if set(ended) <= {"finished"}:
                return f"all {total} rows finished"
            return f"no row failed: {_counts(ended)}"
        kinds = {s: self.histogram.get(s, 0) for s in FAILED_STATUSES if self.histogram.get(s, 0)}
        if list(kinds) == ["error"]:
            return f"{failed} of {total} rows ended in error"
        return f"{failed} of {total} rows failed ({_counts(kinds)})"

    def too_many(self, threshold: int | float | None) -> bool:
        """Whether the failed rows reach ``threshold``: a count (int, at least this many) or a fraction of all
        rows (float in (0, 1]); None: never."""
        check_threshold(threshold)
        if threshold is None or not self.failed:
            return False
        if isinstance(threshold, int):
            return self.failed >= threshold
        return self.failed >= threshold * self.total


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def check_threshold(threshold: Any) -> None:
    """A usable ``fail_when_failed_rows``: None, an int >= 1, or a float in (0, 1]."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"fail_when_failed_rows must be a count (int) or a fraction (float), got {threshold!r}")
    if isinstance(threshold, int) and threshold < 1:
        raise ValueError(f"fail_when_failed_rows as a count must be at least 1, got {threshold!r}")
    if isinstance(threshold, float) and not 0 < threshold <= 1:
        raise ValueError(f"fail_when_failed_rows as a fraction must be in (0, 1], got {threshold!r}")


def final_state(
    histogram: Mapping[str, int],
    stats: Mapping[str, Any],
    threshold: int | float | None = None,
    results: Mapping[str, int] | None = None,
):
    """The flow run's final state: ``Completed`` with the run's outcome as its message and the stats as its
    result, or ``Failed`` (the result a ``TooManyFailedRows``) when the failed rows reach ``threshold``.
    ``results``: finished rows by download state (``JobStore.count_results``)."""
    from prefect.states import Completed, Failed

    outcome = RunOutcome(dict(histogram), dict(results or {}))
    if outcome.too_many(threshold):
        message = f"{outcome.message}, reaching fail_when_failed_rows={threshold!r}"
        return Failed(message=message, data=TooManyFailedRows(message, stats))
    return Completed(message=outcome.message, data=dict(stats))
