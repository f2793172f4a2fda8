"""Fleet recovery (issue 20, finding 8): every job gets an answer or a redelivery, a restarted
worker releases what its killed jobs left before it serves, and an any-free client prints
exactly one slot name."""

from __future__ import annotations

import json
import os
import time

from tests.fleet.conftest import is_mounted, marker_of, wait_mounted

OTHERS = ["h1b", "h2a", "h2b", "h3a", "h3b"]


def _ready_after_release(log: str, box: str) -> None:
    """The restarted worker released box before it said it was ready (served)."""
    last = log.rindex("--- start")
    tail = log[last:]
    assert f"releasing box {box}" in tail, tail
    assert tail.index(f"releasing box {box}") < tail.index("ready"), tail


def test_a_job_of_a_killed_worker_is_run_again_with_the_default_lock_wait(fleet, big):
    """--lock-wait 0 (the default): kill -9 of the worker and its command mid-restore; the
    restarted worker first releases the slot, then runs the redelivered job; the client gets
    its result (it does not wait forever on a job the broker dropped)."""
    client = fleet.spawn("-b", "h1a", "-r", big, "--release", "--json")
    target = fleet.mount_of("h1a")
    try:
        wait_mounted(target, client)
        fleet.kill9("h1")
        assert is_mounted(target)  # the killed run's leftover
        fleet.start("h1")
        _ready_after_release(fleet.log("h1"), "h1a")
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        if "h1" not in fleet.workers:
            fleet.start("h1")
    assert client.returncode == 0, (out, err)
    doc = json.loads(out)
    assert doc["host"] == "h1" and doc["results"][0]["box"] == "h1a"
    assert not is_mounted(target)
    assert marker_of(fleet, "h1a") == "big\n"  # the image, whole


def test_a_client_whose_worker_dies_for_good_gets_a_clear_error(fleet, big):
    """The worker that took the job is killed and does not come back: the client does not
    wait forever; it fails with a message that says what happened, and a worker that comes
    back later does not run the job its client gave up (it releases the slot)."""
    fleet.stop("h1")
    fleet.start("h1", "--heartbeat", "2")
    client = fleet.spawn("-b", "h1a", "-r", big, "--release")
    target = fleet.mount_of("h1a")
    at = fleet.log_size("h1")
    try:
        wait_mounted(target, client)
        fleet.kill9("h1")
        at = fleet.log_size("h1")
        t = time.monotonic()
        out, err = client.communicate(timeout=120)
        took = time.monotonic() - t
        assert client.returncode == 7, (out, err)
        assert "h1a" in err and "went silent" in err, err
        assert took < 60, took
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        if "h1" not in fleet.workers:
            fleet.start("h1")  # the worker comes back (and releases the slot) in any case
    _ready_after_release(fleet.log("h1"), "h1a")
    fleet.wait_log("h1", "its client is gone", at)
    assert not is_mounted(target)


def test_an_any_free_client_prints_one_name_the_slot_that_ran_the_job(fleet, big):
    """`box=$(vmimagemanager -q -b any-free ...)`: one line, the slot that ran the job, even
    when the first worker that claimed a slot was killed and another one ran the job."""
    import contextlib

    from vmim.lock import slot_lock

    client = None
    with contextlib.ExitStack() as held:
        locks = {}
        for box in OTHERS:  # only h1a is free: the others are locked, as by a local command
            locks[box] = held.enter_context(contextlib.ExitStack())
            locks[box].enter_context(slot_lock(os.path.join(fleet.root, box[:2], "locks"), box))
        try:
            client = fleet.spawn("-q", "-b", "any-free", "-r", big, "--release",
                                 "--lock-wait", "60")
            wait_mounted(fleet.mount_of("h1a"), client)
            fleet.kill9("h1")  # mid-restore: the job goes back to vmim.any
            locks["h2a"].close()  # a slot for the handover
            out, err = client.communicate(timeout=120)
            assert client.returncode == 0, (out, err)
            assert out == "h2a\n", (out, err)
            held.close()
            fleet.start("h1")
            _ready_after_release(fleet.log("h1"), "h1a")
            assert not is_mounted(fleet.mount_of("h1a"))
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.communicate()
            if "h1" not in fleet.workers:
                fleet.start("h1")
