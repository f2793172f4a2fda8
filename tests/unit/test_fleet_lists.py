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



class Delivery:
    """A list request as kombu delivers it on the control queue (acknowledged by hand)."""

    def __init__(self, body: bytes, exchange: str = "vmim.control"):
        self.body = body
        self.delivery_info = {"exchange": exchange, "routing_key": ""}
        self.properties = {"reply_to": "vmim.reply." + "c" * 32}
        self.acked = 0

    def ack(self) -> None:
        self.acked += 1


def test_every_list_request_is_acknowledged_once_read_whatever_it_holds():
    """The worker reads the control queue with a prefetch: a request it did not acknowledge
    would hold its place for ever, and the next ones would wait in the broker unread."""
    import json

    from vmim.fleet import protocol
    from vmim.fleet.lists import ListServer

    sent = []
    server = ListServer("h1", children=None, put=lambda e: None,
                        send=lambda *a: sent.append(a), waiting=0)
    server.start_next = server.next  # type: ignore[method-assign]  # served, no list child
    good = json.dumps({"v": protocol.VERSION, "type": "lists", "job_id": "a" * 32,
                       "lists": ["boxes"]}).encode()
    deliveries = [Delivery(good), Delivery(good), Delivery(b"{not json"),
                  Delivery(good, exchange="")]
    for d in deliveries:
        server.request(d)
    assert [d.acked for d in deliveries] == [1, 1, 1, 1]
    assert [r.type for _q, _c, r in sent] == ["here", "here", "lists"]  # the 2nd: busy
    assert sent[-1][2].exit_code == 5
