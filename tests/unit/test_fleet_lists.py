"""The worker's queue of list requests (vmim/fleet/lists.py), without a broker."""

from __future__ import annotations

from vmim.fleet.lists import ListJob, ListQueue


def req(n: int) -> ListJob:
    return ListJob(("boxes",), "q", f"{n:032x}")


def test_one_list_is_served_at_a_time_and_at_most_n_wait():
    q = ListQueue(waiting=2)
    assert q.offer(req(1)) and q.next() == req(1)
    assert q.next() is None  # one at a time
    assert q.offer(req(2)) and q.offer(req(3))
    assert not q.offer(req(4))  # full: the caller answers busy
    assert q.next() is None
    q.done()
    assert q.next() == req(2)  # in the order they came
    assert q.offer(req(5))
    q.done()
    assert q.next() == req(3)
    q.clear()
    q.done()
    assert q.next() is None and q.serving is None

