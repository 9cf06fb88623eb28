"""Why a job failed, in one line: the backend's error log entries, shortened for rows, states and events.

The full logs are still saved beside the results (``job_{id}/job_{id}_errors.json``).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Longest reason kept in a row's ``message`` (and shown in task-run states, events, summaries).
MAX_REASON = 300


def shorten(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)].rstrip() + "…"


def failure_reason(logs: Sequence[dict] | None, *, logs_error: str | None = None, limit: int = MAX_REASON) -> str:
    """The backend's reason for a failed job: its last error-level log entry (with its code), and how many
    more there are; or why there is no reason."""
    if logs is None:
        return shorten(f"the backend's error logs could not be read: {logs_error}" if logs_error else "no reason given")
    errors = [e for e in logs if isinstance(e, dict) and str(e.get("level") or "error").lower() == "error"]
    if not errors:
        return "the backend logged no error-level entry"
    last = errors[-1]
    text = " ".join(str(last.get("message") or "(empty message)").split())
    code = last.get("code")
    if code and not text.startswith(str(code)):
        text = f"{code}: {text}"
    more = f" (+{len(errors) - 1} more error log entries)" if len(errors) > 1 else ""
    return shorten(text, limit - len(more)) + more
