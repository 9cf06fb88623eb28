"""The pure state machine: how a backend's status folds into a row's status, and what it means."""

import pytest

from prefect_openeo.states import Event, observe


@pytest.mark.parametrize(
    ("previous", "reported", "start_requested", "status", "events"),
    [
        ("created", "created", False, "created", ()),
        ("created", "created", True, "queued_for_start", ()),  # the backend needs time to start it
        ("queued_for_start", "created", False, "queued_for_start", ()),
        ("queued_for_start", "queued", True, "queued", ()),
        ("queued", "running", False, "running", (Event.STARTED_RUNNING,)),
        ("running", "running", False, "running", ()),  # counted once
        ("running", "finished", False, "finished", (Event.FINISHED,)),
        ("queued", "finished", False, "finished", (Event.FINISHED,)),  # never seen running
        ("running", "error", False, "error", (Event.FAILED,)),
        ("queued", "canceled", False, "canceled", (Event.CANCELED,)),
        ("finished", "running", False, "finished", ()),  # terminal rows never move back
        ("skipped", "created", False, "skipped", ()),
    ],
)
def test_observe(previous, reported, start_requested, status, events):
    transition = observe(previous, reported, start_requested=start_requested)
    assert transition.status == status
    assert transition.events == events


def test_unknown_backend_status_is_an_error():
    with pytest.raises(ValueError, match="Unknown openEO job status 'done'"):
        observe("running", "done", start_requested=False)
