"""The worker's bookkeeping of slots and jobs (vmim/fleet/scheduler.py), without a broker."""

from __future__ import annotations

from vmim.fleet.scheduler import Job, Slots
from vmim.invocation import BoxRun


def job(box: str = "", deadline: float = 100.0, any_free: bool = False) -> Job:
    return Job(job_id="a" * 32, box=box, run=BoxRun(), reply_to="q", message=None,
               deadline=deadline, any_free=any_free)


def test_a_box_job_runs_at_once_or_waits_for_the_any_free_job_on_its_slot():
    s = Slots(["web1", "web2"])
    anyjob = job(any_free=True)
    s.claim(anyjob, "web1")
    assert anyjob.box == "web1" and s.idle() == ["web2"]
    routed = job("web1")
    assert s.hold(routed) is False  # waits: the any-free job holds web1
    assert s.held() == [anyjob, routed] and s.idle() == ["web2"]
    assert s.done(anyjob) is routed  # web1's next job
    assert s.running == {} and s.waiting == {}
    other = job("web2")
    assert s.hold(other) is True and s.busy()


def test_a_dropped_job_frees_its_slot_and_only_its_own():
    s = Slots(["web1"])
    first, second = job("web1"), job("web1")
    assert s.hold(first) and not s.hold(second)
    s.drop(second)  # its client is gone
    assert s.running == {"web1": first} and s.waiting == {}
    s.drop(job("web1"))  # not the holder: nothing changes
    assert s.running == {"web1": first}


def test_waiting_jobs_expire_at_their_deadline():
    s = Slots(["web1"])
    s.hold(job("web1"))
    late = job("web1", deadline=50.0)
    s.hold(late)
    assert s.expired(now=40.0) == []
    assert s.expired(now=60.0) == [late] and s.waiting == {}
    s.clear()
    assert not s.busy() and s.idle() == ["web1"]


def test_an_undelivered_result_is_offered_again_until_its_patience_is_spent():
    from vmim.fleet.scheduler import Undelivered

    u = Undelivered(patience=10.0)
    u.add("q", "a" * 32, "reply", now=0.0)
    item = u.due(now=0.5)[0]
    assert u.due(now=0.6) == []  # once a second
    assert u.keep(item, now=5.0) and u.due(now=5.0) == [item]
    assert not u.keep(item, now=11.0) and u.due(now=12.0) == []
