"""What a broker client must not be able to do to a worker: exhaust it (list requests without
bound), leave a slot reserved, reuse a job id, keep an expired job circulating. The hostile
messages are published with kombu directly, by a broker user with only the client permissions
of docs/fleet.md (conftest.Sender)."""

from __future__ import annotations

import os
import time

from tests.fleet.conftest import is_mounted, queue_depth
from tests.fleet.test_fleet_trust import v2_job
from vmim.fleet import protocol
from vmim.fleet.lists import WAITING


def list_request() -> dict:
    return {"v": protocol.VERSION, "type": "lists", "job_id": os.urandom(16).hex(),
            "lists": ["boxes"]}


def test_a_flood_of_list_requests_is_served_one_at_a_time_and_the_rest_is_busy(fleet, sender):
    """30 list requests at once: each worker serves one at a time with at most WAITING more
    waiting, answers every other one it reads at once with exit 5 (what it has not read yet
    waits in the broker, which refuses what is past its bound), and a client asking
    meanwhile exits 5; afterwards the lists are served again."""
    hosts = ("h1", "h2", "h3")
    corrs = [sender.send(list_request(), exchange="vmim.control", routing_key="")
             for _ in range(30)]
    client = fleet.spawn("-l")
    # the workers stay busy until the client has its answer: the 30 alone may all be served
    # before a client that starts slowly asks (a full run on 2026-12-07 saw it served, exit 0)
    deadline = time.monotonic() + 120
    while client.poll() is None and time.monotonic() < deadline:
        sender.send(list_request(), exchange="vmim.control", routing_key="")
        time.sleep(0.05)
    out, err = client.communicate(timeout=180)
    settle(sender)
    for h in hosts:
        answers = [r for c in corrs for r in sender.replies.get(c, [])
                   if r.get("type") == "lists" and r.get("host") == h]
        read = [c for c in corrs if any(r.get("type") == "here" and r.get("host") == h
                                         for r in sender.replies.get(c, []))]
        assert len(answers) == len(read) >= 1 + WAITING, (h, len(answers), len(read))
        served = [a for a in answers if a["exit_code"] == 0]
        busy = [a for a in answers if a["exit_code"] == 5]
        assert len(served) + len(busy) == len(answers), answers
        assert len(served) <= 1 + WAITING + 1, (h, len(served))  # +1: one served meanwhile
        assert all("busy" in a["stderr"][0] for a in busy), busy
        assert all(a["doc"].get("boxes") for a in served)
    assert client.returncode == 5, (out, err)
    assert "busy" in err
    r = fleet.vmim("-l", "--json")
    assert r.code == 0, r
    assert r.json()["hosts"] == list(hosts)


def settle(sender, quiet: float = 5.0, timeout: float = 180) -> None:
    """Collect replies until none came for `quiet` seconds (list children: one at a time)."""
    deadline = time.monotonic() + timeout
    last, count = time.monotonic(), -1
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        n = sum(len(v) for v in sender.replies.values())
        if n != count:
            last, count = time.monotonic(), n
        try:
            sender.conn.drain_events(timeout=0.2)
        except (TimeoutError, OSError):
            pass


def test_a_flood_of_list_requests_waits_bounded_in_the_broker(fleet, sender):
    """2000 list requests while the workers are frozen (or just slower than the flood): a
    worker reads list requests as it serves them, and what it has not read waits in the
    broker, which keeps CONTROL_LENGTH of them per worker and refuses the rest. Before, the
    broker pushed every one into the worker's memory (a deque without bound) and each cost
    it two confirmed publishes once it woke. A client asking meanwhile is told at once that
    a worker is busy (exit 5) rather than finding no worker there (exit 7); once the workers
    have served what they read, the lists come again."""
    import signal

    from vmim.fleet.topology import CONTROL_LENGTH

    hosts = ("h1", "h2", "h3")
    for h in hosts:
        fleet.signal_group(h, signal.SIGSTOP)
    try:
        corrs = [sender.send(list_request(), exchange="vmim.control", routing_key="")
                 for _ in range(2000)]
        sender.channel.basic_qos(0, 0, False)  # a round trip: the flood is in the broker
        meanwhile = fleet.vmim("-l", timeout=60)
    finally:
        for h in hosts:
            fleet.signal_group(h, signal.SIGCONT)
    settle(sender)
    for h in hosts:
        read = [c for c in corrs if any(r.get("type") == "here" and r.get("host") == h
                                         for r in sender.replies.get(c, []))]
        assert 1 <= len(read) <= 2 * CONTROL_LENGTH, (h, len(read))  # ready + prefetched
    assert meanwhile.code == 5, meanwhile
    assert "busy" in meanwhile.err and "Traceback" not in meanwhile.err, meanwhile.err
    deadline = time.monotonic() + 120
    while (r := fleet.vmim("-l", "--json")).code == 5 and time.monotonic() < deadline:
        time.sleep(1)
    assert r.code == 0, r
    assert r.json()["hosts"] == list(hosts)


def test_a_job_that_cannot_start_is_answered_and_frees_its_slot(fleet, sender):
    """The worker cannot start the job (here: its journal entry cannot be written, a
    directory stands where its temporary file goes): the client gets exit 7 with the reason,
    the message is acknowledged, the worker keeps its connection, and the slot is not left
    reserved — the next job runs at once."""
    body = v2_job("h3a", {"actions": ["release"]})
    jobs = os.path.join(fleet.root, "h3", "state", "fleet", "jobs")
    os.makedirs(jobs, mode=0o700, exist_ok=True)
    tmp = os.path.join(jobs, f".{body['job_id']}.json.{fleet.workers['h3'].pid}.tmp")
    os.mkdir(tmp, 0o700)
    try:
        corr = sender.send(body, routing_key="box.h3a")
        sender.wait([corr], timeout=30)
        reply = sender.result(corr)
        assert reply is not None, sender.replies.get(corr)
        assert reply["exit_code"] == 7, reply
        assert "could not start the job" in reply["doc"]["error"]["message"], reply
        assert queue_depth(fleet.broker, "vmim.host.h3.box.h3a") == 0
        t = time.monotonic()
        r = fleet.vmim("-b", "h3a", "--release", "--lock-wait", "20")
        assert r.code == 0, r
        assert time.monotonic() - t < 15
        assert "lost the broker" not in fleet.log("h3")
    finally:
        os.rmdir(tmp)


def test_a_job_id_in_use_is_refused_with_exit_2(fleet, sender):
    """A message that reuses the id of a job the worker ran (another request) or holds now is
    refused with exit 2: it is not run, and its client does not get the other job's result."""
    first = v2_job("h1b", {"actions": ["release"]})
    corr = sender.send(first, routing_key="box.h1b")
    sender.wait([corr], timeout=30)
    assert sender.result(corr)["exit_code"] == 0, sender.replies.get(corr)
    sender.replies.clear()
    reuse = dict(first, request={"actions": ["mount"]}, deadline=time.time() + 30)
    sender.send(reuse, routing_key="box.h1b")
    sender.wait([corr], timeout=30)
    reply = sender.result(corr)
    assert reply is not None and reply["exit_code"] == 2, sender.replies.get(corr)
    assert "in use by another job" in reply["doc"]["error"]["message"]
    assert not is_mounted(fleet.mount_of("h1b"))  # not run
    # the same id on two slots of one worker at once: one runs, the other is refused
    sender.replies.clear()
    twin = v2_job("h1a", {"actions": ["release"]})
    sender.send(twin, routing_key="box.h1a")
    sender.send(dict(twin, box="h1b"), routing_key="box.h1b")
    deadline = time.monotonic() + 30
    while len([r for r in sender.replies.get(twin["job_id"], []) if r.get("type") == "result"]) < 2:
        assert time.monotonic() < deadline, sender.replies
        try:
            sender.conn.drain_events(timeout=0.2)
        except (TimeoutError, OSError):
            pass
    results = [r for r in sender.replies[twin["job_id"]] if r.get("type") == "result"]
    assert sorted(r["exit_code"] for r in results) == [0, 2], results
    assert len({r["box"] for r in results if r["exit_code"] == 0} & {"h1a", "h1b"}) == 1


def test_an_any_free_job_that_finds_no_free_slot_until_its_deadline_gets_exit_5(fleet, sender):
    """Every slot of the fleet is busy (mounted): an any-free job goes back to the queue for
    another worker until its deadline, then it is answered with exit 5 and acknowledged —
    it does not circulate between the workers for the day of its TTL."""
    boxes = [f"{h}{s}" for h in ("h1", "h2", "h3") for s in "ab"]
    try:
        for box in boxes:
            r = fleet.vmim("-b", box, "--mount")
            assert r.code == 0, r
        body = v2_job("any-free", {"actions": ["release"]}, deadline=time.time() + 3)
        t = time.monotonic()
        corr = sender.send(body, routing_key="any")
        sender.wait([corr], timeout=30)
        reply = sender.result(corr)
        assert reply is not None, sender.replies.get(corr)
        assert reply["exit_code"] == 5, reply
        assert "no slot was free" in reply["doc"]["error"]["message"], reply
        assert time.monotonic() - t < 20
        assert queue_depth(fleet.broker, "vmim.any") == 0
        assert all(is_mounted(fleet.mount_of(b)) for b in boxes)  # the job did not run
    finally:
        for box in boxes:
            fleet.vmim("-b", box, "--release")


class FakeWorker:
    """Not a worker: a broker peer that takes the jobs of box `box` (or list requests) and
    answers whatever the test wants, as a broken or foreign worker would."""

    def __init__(self, url: str, box: str = "", lists: bool = False):
        import kombu

        self.conn = kombu.Connection(url)
        self.conn.connect()
        ch = self.conn.channel()
        if lists:
            ex = kombu.Exchange(protocol.CONTROL, type="fanout", durable=True)
            q = kombu.Queue(f"vmim.control.fake.{os.urandom(4).hex()}", ex, exclusive=True,
                            auto_delete=True, durable=False)
        else:
            ex = kombu.Exchange(protocol.JOBS, type=protocol.JOBS_TYPE, durable=True)
            q = kombu.Queue(f"vmim.host.fake.box.{box}", ex, routing_key=protocol.box_key(box),
                            durable=False, auto_delete=True)
        self.got: list = []
        self.consumer = kombu.Consumer(ch, queues=[q], no_ack=True,
                                       on_message=self.got.append)
        self.consumer.consume()
        self.producer = kombu.Producer(ch)

    def answer(self, *bodies, timeout: float = 30, corr=None) -> None:
        """Wait for a request, then send each body (bytes or dict) to its reply queue, under
        the request's correlation id or corr."""
        import json

        deadline = time.monotonic() + timeout
        while not self.got:
            assert time.monotonic() < deadline, "no request came"
            try:
                self.conn.drain_events(timeout=0.2)
            except (TimeoutError, OSError):
                pass
        msg = self.got[0]
        for body in bodies:
            raw = json.dumps(body).encode() if isinstance(body, dict) else body
            self.producer.publish(raw, routing_key=msg.properties["reply_to"],
                                  correlation_id=corr or msg.properties["correlation_id"],
                                  user_id=self.conn.userid,  # as a worker does (guest)
                                  content_type="application/json", content_encoding="utf-8",
                                  serializer=None)

    def close(self) -> None:
        self.conn.release()


def reply(kind: str, **fields) -> dict:
    return dict({"v": protocol.VERSION, "type": kind, "host": "hx"}, **fields)


def test_a_malformed_result_or_reply_is_exit_7_not_a_crash(fleet):
    """A peer that is not a worker of this release answers a job with a result of another
    shape, or with bytes that are not a reply: the client exits 7 and says so."""
    cases = [
        ("the result from host hx: results[0] is not an object",
         (reply("result", box="hx1", exit_code=0, doc={"results": ["x", 1]}, stderr=[]),)),
        ("plan of hx1: steps is not a list", (reply("result", box="hx1", exit_code=0,
                           doc={"plan": {"hx1": {"steps": "down"}}}, stderr=[]),)),
        ("malformed reply", (b"{not json",)),
        ("malformed reply", (reply("result", box="hx1", exit_code="zero"),)),
    ]
    for why, bodies in cases:
        fake = FakeWorker(fleet.broker.url, box="hx1")
        try:
            client = fleet.spawn("-b", "hx1", "--mount", "--dry-run", "--lock-wait", "20")
            fake.answer(*bodies)
            out, err = client.communicate(timeout=60)
        finally:
            fake.close()
        assert client.returncode == 7, (why, out, err)
        assert why in err and "Traceback" not in err, (why, err)


def test_a_malformed_reply_to_another_job_does_not_end_the_client(fleet):
    """Any broker user may publish to a client's reply queue: what answers no request of this
    client is not read, malformed or not; the answer to its job is."""
    fake = FakeWorker(fleet.broker.url, box="hx1")
    try:
        client = fleet.spawn("-b", "hx1", "--mount", "--dry-run", "--lock-wait", "20")
        fake.answer(b"{not json", reply("result", box="hx1", exit_code=4, doc={}, stderr=[]),
                    corr="someone-elses-job")
        fake.answer(reply("result", box="hx1", exit_code=0, doc={"results": []}, stderr=[]))
        out, err = client.communicate(timeout=60)
    finally:
        fake.close()
    assert client.returncode == 0, (out, err)
    assert "malformed" not in err, err


def test_malformed_lists_are_exit_7_not_a_crash(fleet):
    """A peer on the control fanout answers a list request with lists of another shape:
    the client exits 7 naming the host, and prints no table built from them."""
    fake = FakeWorker(fleet.broker.url, lists=True)
    try:
        client = fleet.spawn("-l")
        fake.answer(reply("here"), reply("lists", exit_code=0, doc={"boxes": [1, "x"]},
                                         stderr=[]))
        out, err = client.communicate(timeout=180)
    finally:
        fake.close()
    assert client.returncode == 7, (out, err)
    assert "the lists from host hx" in err and "Traceback" not in err, err


def test_a_client_never_waits_without_bound_on_a_frozen_broker(tmp_path):
    """The broker freezes (SIGSTOP) while a client waits for its job to be taken: the client
    ends with exit 5 when its wait is over — closing its connection to a broker that no longer
    answers does not hang it."""
    import signal
    import subprocess
    import sys

    import kombu

    from tests.fleet import broker as broker_mod
    from tests.fleet.conftest import declare_shared, env

    b = broker_mod.Broker(str(tmp_path))
    b.start()
    beam = 0
    try:
        declare_shared(b.url)  # a fleet that served before: the client publishes at once
        with kombu.Connection(b.url) as conn:  # a slot queue nobody consumes: never taken
            ex = kombu.Exchange(protocol.JOBS, type=protocol.JOBS_TYPE, durable=True)
            kombu.Queue("vmim.host.hz.box.hz1", ex, routing_key="box.hz1",
                        durable=True)(conn.default_channel).declare()
        client = subprocess.Popen([sys.executable, "-m", "vmim", "--broker", b.url, "-b", "hz1",
                                   "--mount", "--lock-wait", "3"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env())
        time.sleep(2)  # connected and published
        with open(b.pidfile) as fh:
            beam = int(fh.read().strip())
        os.kill(beam, signal.SIGSTOP)
        t = time.monotonic()
        try:
            out, err = client.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            client.kill()
            client.communicate()
            raise AssertionError("the client hung on the frozen broker") from None
        assert client.returncode == 5, (out, err)
        assert time.monotonic() - t < 30
    finally:
        if beam:
            os.kill(beam, signal.SIGCONT)
        b.stop()


def test_one_full_queue_of_list_requests_does_not_hide_the_other_hosts(fleet, broker):
    """A worker's queue of list requests refuses what it cannot hold (reject-publish), and the
    broker then refuses (nacks) the client's request as a whole, though every other worker's
    queue took it. One stalled worker — or a compromised host, whose user may declare a
    control queue of its own of length 0 — made every client's -l exit 5 with no list at
    all. Now the lists of the hosts that answered are printed, and the exit is 5 with a
    message saying a worker's queue was full."""
    import kombu

    from tests.fleet.conftest import add_host_user

    host = f"st{os.getpid()}"
    url = add_host_user(broker, host, [])
    try:
        with kombu.Connection(url) as conn:
            control = kombu.Exchange(protocol.CONTROL, type="fanout", passive=True)
            kombu.Queue(f"vmim.control.{host}.0badc0de", control, exclusive=True,
                        auto_delete=True, queue_arguments={"x-max-length": 0,
                                                           "x-overflow": "reject-publish"}
                        )(conn.default_channel).declare()
            lists = fleet.vmim("-l", "--json")
            text = fleet.vmim("-l")
    finally:
        broker.ctl("delete_user", host)
    assert lists.code == 5, lists
    assert lists.json()["hosts"] == ["h1", "h2", "h3"], lists.out
    assert "queue of list requests is full" in lists.err, lists.err
    assert text.code == 5 and "h2a" in text.out, text
