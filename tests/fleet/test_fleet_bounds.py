"""What a broker client must not be able to do to a worker: exhaust it (list requests without
bound), leave a slot reserved, reuse a job id, keep an expired job circulating. The hostile
messages are published with kombu directly, by a broker user with only the client permissions
of docs/fleet.md (conftest.Sender)."""

from __future__ import annotations

import os
import time

from vmim.fleet import protocol
from vmim.fleet.lists import WAITING


def list_request() -> dict:
    return {"v": protocol.VERSION, "type": "lists", "job_id": os.urandom(16).hex(),
            "lists": ["boxes"]}


def wait_lists(sender, corrs, hosts, timeout: float = 120) -> None:
    """Until every request has a `lists` answer from every host, or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len({r.get("host") for r in sender.replies.get(c, []) if r.get("type") == "lists"})
               >= len(hosts) for c in corrs):
            return
        try:
            sender.conn.drain_events(timeout=0.2)
        except (TimeoutError, OSError):
            pass


def test_a_flood_of_list_requests_is_served_one_at_a_time_and_the_rest_is_busy(fleet, sender):
    """30 list requests at once: each worker serves one at a time with at most WAITING more
    waiting, answers every other one at once with exit 5, and a client asking meanwhile exits
    5; afterwards the lists are served again."""
    hosts = ("h1", "h2", "h3")
    corrs = [sender.send(list_request(), exchange="vmim.control", routing_key="")
             for _ in range(30)]
    client = fleet.spawn("-l")
    wait_lists(sender, corrs, hosts)
    out, err = client.communicate(timeout=180)
    for h in hosts:
        answers = [r for c in corrs for r in sender.replies.get(c, [])
                   if r.get("type") == "lists" and r.get("host") == h]
        assert len(answers) == 30, (h, len(answers))  # every request is answered
        served = [a for a in answers if a["exit_code"] == 0]
        busy = [a for a in answers if a["exit_code"] == 5]
        assert len(served) + len(busy) == 30, answers
        assert len(served) <= 1 + WAITING + 1, (h, len(served))  # +1: one served meanwhile
        assert all("busy" in a["stderr"][0] for a in busy), busy
        assert all(a["doc"].get("boxes") for a in served)
    assert client.returncode == 5, (out, err)
    assert "busy" in err
    r = fleet.vmim("-l", "--json")
    assert r.code == 0, r
    assert r.json()["hosts"] == list(hosts)
