"""The fleet with a real RabbitMQ node and three workers on this machine (see conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.fleet.conftest import is_mounted, marker_of, stop_process, wait_mounted


def write_in(fleet, box: str, name: str, text: str) -> None:
    """Write a file into box's filesystem through the fleet (mount, write, release)."""
    r = fleet.vmim("-b", box, "--mount")
    assert r.code == 0, r
    with open(os.path.join(fleet.mount_of(box), name), "w") as fh:
        fh.write(text)
    r = fleet.vmim("-b", box, "--release")
    assert r.code == 0, r


def test_fleet_list_shows_every_box_with_its_host(fleet):
    r = fleet.vmim("-l", "--json")
    assert r.code == 0, r
    doc = r.json()
    got = {(b["host"], b["name"]) for b in doc["boxes"] if b["in_config"]}
    # the host's other libvirt domains (listed too, without a slot) are none of the test's
    assert got == {(h, f"{h}{s}") for h in ("h1", "h2", "h3") for s in "ab"}
    assert doc["hosts"] == ["h1", "h2", "h3"]
    text = fleet.vmim("-l", "-f")
    assert text.code == 0, text
    lines = text.out.splitlines()
    assert lines[0].split()[:2] == ["HOST", "NAME"]
    assert any(line.split()[:2] == ["h2", "h2b"] for line in lines)


def test_store_and_restore_route_to_the_owning_host(fleet):
    write_in(fleet, "h1b", "marker", "from h1b\n")
    st = fleet.vmim("-b", "h1b", "-s", "gold", "--release", "--json")
    assert st.code == 0, st
    assert st.json()["host"] == "h1"
    assert st.json()["results"][0]["host"] == "h1"
    assert "store" in st.err  # the worker's step lines reach the client's stderr
    images = fleet.vmim("-L", "--json")
    assert images.code == 0, images
    gold = [e for e in images.json()["images"] if e["name"] == "gold"]
    assert len(gold) == 1 and sorted(gold[0]["hosts"]) == ["h1", "h2", "h3"]  # one shared store

    rs = fleet.vmim("-b", "h2b", "-r", "gold", "--mount", "--json")
    assert rs.code == 0, rs
    assert rs.json()["host"] == "h2"
    try:
        with open(os.path.join(fleet.mount_of("h2b"), "marker")) as fh:
            assert fh.read() == "from h1b\n"
    finally:
        rel = fleet.vmim("-b", "h2b", "--release")
    assert rel.code == 0, rel
    assert not is_mounted(fleet.mount_of("h2b"))


def test_dry_run_and_print_xml_come_from_the_owning_host(fleet):
    r = fleet.vmim("-b", "h3a", "-r", "gold", "-u", "--dry-run")
    assert r.code == 0, r
    assert r.out.startswith("box h3a:\n  1. ")
    assert "restore" in r.out
    assert r.out.splitlines()[-1].startswith("(dry run: nothing was changed; the run would exit 0")
    x = fleet.vmim("-b", "h2a", "--print-xml", "--json")
    assert x.code == 0, x
    assert x.json()["host"] == "h2" and "<name>h2a</name>" in x.json()["xml"]["h2a"]


def test_unknown_box_is_exit_4_at_once(fleet):
    t = time.monotonic()
    r = fleet.vmim("-b", "nosuchbox", "-u", "--lock-wait", "60")
    assert r.code == 4, r
    assert "unknown box 'nosuchbox'" in r.err
    assert time.monotonic() - t < 10


def test_concurrent_any_free_jobs_get_distinct_slots(fleet):
    procs = [fleet.spawn("-b", "any-free", "--mount", "--lock-wait", "20") for _ in range(6)]
    outs = [(p.wait(120), *p.communicate()) for p in procs]
    try:
        assert all(code == 0 for code, _o, _e in outs), outs
        claimed = [o.splitlines()[0] for _c, o, _e in outs]
        assert sorted(claimed) == sorted(f"{h}{s}" for h in ("h1", "h2", "h3") for s in "ab")
        for box in claimed:
            assert is_mounted(fleet.mount_of(box))
        # every slot is taken now: one more waits its --lock-wait, then exit 5
        t = time.monotonic()
        more = fleet.vmim("-b", "any-free", "--mount", "--lock-wait", "2")
        assert more.code == 5, more
        assert "no worker took the job" in more.err
        assert time.monotonic() - t < 15
    finally:
        released = [fleet.vmim("-b", f"{h}{s}", "--release") for h in ("h1", "h2", "h3")
                    for s in "ab"]
    assert all(r.code == 0 for r in released), released
    assert not any(is_mounted(fleet.mount_of(f"{h}{s}")) for h in ("h1", "h2", "h3") for s in "ab")


def test_many_any_free_jobs_never_share_a_slot(fleet):
    """Twice as many short any-free jobs as slots, at once: all done, none on a slot another
    job held (before the fix a worker gave one slot to two jobs while it waited for a
    publisher confirm; the second then waited on the slot's lock)."""
    procs = [fleet.spawn("-b", "any-free", "--mount", "--release", "--json",
                         "--lock-wait", "120") for _ in range(12)]
    outs = [(p.wait(180), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _o, _e in outs), outs
    claimed = {json.loads(o)["claimed"] for _c, o, _e in outs}
    assert len(claimed) > 3  # spread over the hosts' slots
    assert fleet.overlapping_jobs() == 0


def test_job_of_a_killed_worker_is_done_when_it_is_back(fleet, big):
    """kill -9 of a worker (and its job's command) mid-restore: the slot stays mounted; the
    restarted worker releases it and runs the redelivered job; the client gets the result."""
    client = fleet.spawn("-b", "h1a", "-r", "big", "--release", "--json", "--lock-wait", "60")
    target = fleet.mount_of("h1a")
    wait_mounted(target, client)
    fleet.kill9("h1")
    assert is_mounted(target)  # the killed run's leftover
    assert client.poll() is None  # the client waits for the job

    fleet.start("h1")
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, (out, err)
    doc = json.loads(out)
    assert doc["host"] == "h1" and doc["results"][0]["box"] == "h1a"
    assert "releasing box h1a" in fleet.log("h1")
    assert not is_mounted(target)
    assert marker_of(fleet, "h1a") == "big\n"  # the image, whole


def test_worker_stops_on_sigterm_with_exit_0(fleet):
    assert fleet.stop("h3") == 0
    assert "worker h3 stopped" in fleet.log("h3")
    fleet.start("h3")


def test_unreachable_broker_is_exit_7(fleet):
    import subprocess
    import sys

    from tests.fleet.broker import free_port
    from tests.fleet.conftest import env

    res = subprocess.run([sys.executable, "-m", "vmim", "--broker",
                          f"amqp://guest:guest@127.0.0.1:{free_port()}//", "-b", "h1a", "-u"],
                         capture_output=True, text=True, env=env(), timeout=60)
    assert res.returncode == 7, res
    assert "cannot reach the broker" in res.stderr and "guest:***@" in res.stderr


def test_a_frozen_worker_loses_its_job_to_another_and_aborts_its_copy(fleet, big):
    """SIGSTOP of a worker and its job's command past the heartbeat: the broker hands the
    any-free job to another worker, which does it; the frozen one, woken, aborts its copy
    (the command cleans up: the slot is released) and serves again."""
    fleet.stop("h1")
    fleet.start("h1", "--heartbeat", "2")
    others = ["h1b", "h2a", "h2b", "h3a", "h3b"]
    for box in others:  # only h1a is free
        assert fleet.vmim("-b", box, "--mount").code == 0
    try:
        client = fleet.spawn("-b", "any-free", "-r", big, "--release", "--json",
                             "--lock-wait", "120")
        wait_mounted(fleet.mount_of("h1a"), client)
        at = fleet.log_size("h1")
        fleet.signal_group("h1", signal.SIGSTOP)
        try:
            assert fleet.vmim("-b", "h2a", "--release").code == 0  # a slot for the handover
            out, err = client.communicate(timeout=90)
        finally:
            fleet.signal_group("h1", signal.SIGCONT)
        assert client.returncode == 0, (out, err)
        doc = json.loads(out)
        assert doc["host"] == "h2" and doc["claimed"] == "h2a", doc
        fleet.wait_log("h1", "lost the broker", at)
        fleet.wait_log("h1", "worker h1: ready", at)
        deadline = time.monotonic() + 30
        while is_mounted(fleet.mount_of("h1a")):
            assert time.monotonic() < deadline, \
                "the frozen worker's copy was not aborted; its log:\n" + fleet.log_since("h1", at)
            time.sleep(0.1)
        fleet.wait_log("h1", "aborted; its command exited", at)  # no client hears of it
    finally:
        for box in others:
            fleet.vmim("-b", box, "--release")


def test_jobs_survive_a_broker_restart_and_workers_reconnect(fleet, broker):
    """A job waiting for its host (h3 is down) survives a broker restart; the waiting client
    and the workers reconnect; h3, back, runs the job and the client gets its result."""
    fleet.stop("h3")
    client = fleet.spawn("-b", "h3b", "--mount", "--lock-wait", "300", "--json")
    deadline = time.monotonic() + 30
    while not _queued(broker, "vmim.host.h3.box.h3b"):
        assert time.monotonic() < deadline, "the job never reached h3b's queue"
        time.sleep(0.1)
    at = {h: fleet.log_size(h) for h in ("h1", "h2")}
    broker.stop_node()
    broker.start()
    try:
        for h in ("h1", "h2"):
            fleet.wait_log(h, f"worker {h}: ready", at[h], timeout=60)
        time.sleep(2)  # the client too is back on its reply queue (it retries every 1 s)
        fleet.start("h3")
        out, err = client.communicate(timeout=90)
        assert client.returncode == 0, (out, err)
        assert "lost the broker" in err
        assert json.loads(out)["host"] == "h3"
        assert is_mounted(fleet.mount_of("h3b"))
        lst = fleet.vmim("-l", "--json")
        assert lst.code == 0, lst
        assert sorted({b["host"] for b in lst.json()["boxes"]}) == ["h1", "h2", "h3"]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if "h3" not in fleet.workers:
            fleet.start("h3")
        fleet.vmim("-b", "h3b", "--release")
    assert not is_mounted(fleet.mount_of("h3b"))


def _queued(broker, queue: str) -> bool:
    out = broker.ctl("list_queues", "name", "messages_ready").stdout
    return any(line.split() == [queue, "1"] for line in out.splitlines())


def test_per_host_users_are_limited_to_their_own_queues(fleet, broker, tmp_path):
    """The permissions of docs/fleet.md (vmim.fleet.permissions): a host user serves its own
    slots, is refused (403) another host's queues and may not publish jobs; the client user
    may."""
    import subprocess
    import sys

    from tests.fleet.conftest import add_client_user, add_host_user, env, one_slot_worker

    url = {"h9": add_host_user(broker, "h9", ["p9a"]), "ci": add_client_user(broker, "ci", "pw-ci")}
    logs = {name: tmp_path / f"{name}.log" for name in ("own", "other")}
    workers = {}
    try:
        for name, host in (("own", "h9"), ("other", "h1")):
            workers[name] = one_slot_worker(tmp_path, "p9a", url["h9"], host, logs[name])
        deadline = time.monotonic() + 30
        while ("worker h9: ready" not in logs["own"].read_text()
               or "ACCESS_REFUSED" not in logs["other"].read_text()):
            assert time.monotonic() < deadline, (logs["own"].read_text(),
                                                 logs["other"].read_text())
            time.sleep(0.1)
        assert "worker h1: ready" not in logs["other"].read_text()
        assert "may bind any routing key" not in logs["own"].read_text()  # its topic permissions
        assert "may declare and delete what every host shares" not in logs["own"].read_text()
        assert "refused" in logs["other"].read_text()

        def client(user, *argv):
            return subprocess.run([sys.executable, "-m", "vmim", "--broker", url[user], *argv],
                                  capture_output=True, text=True, env=env(), timeout=120)

        lst = client("ci", "-l", "--json")
        assert lst.returncode == 0, lst
        url["wrong"] = url["ci"].replace(":pw-ci@", ":not-the-password@")
        wrong = client("wrong", "-l")
        assert wrong.returncode == 7, wrong
        assert "refused user ci: wrong password or permissions" in wrong.stderr
        assert "cannot reach" not in wrong.stderr
        assert ("h9", "p9a") in {(b["host"], b["name"]) for b in json.loads(lst.stdout)["boxes"]}
        denied = client("h9", "-b", "h1a", "--mount")
        assert denied.returncode == 7, denied
        assert "refused" in denied.stderr and "ACCESS_REFUSED" in denied.stderr
        assert not is_mounted(fleet.mount_of("h1a"))
    finally:
        for p in workers.values():
            stop_process(p)
        broker.ctl("delete_user", "h9")
        broker.ctl("delete_user", "ci")


def test_a_redelivered_finished_job_is_answered_from_the_journal(fleet, broker):
    """A job whose id the worker's journal holds as done (it finished, and the worker died
    before its acknowledgement reached the broker) is answered from the journal, not run."""
    import kombu

    from vmim.fleet import protocol
    from vmim.fleet.journal import Journal
    from vmim.invocation import BoxRun
    from vmim.plan import Request

    job_id = protocol.new_job_id()
    job = protocol.Job(job_id, "h2b", time.time() + 30, BoxRun(Request(actions=("mount",))))
    kept = {"type": "result", "host": "h2", "box": "h2b", "exit_code": 0,
            "doc": {"results": [{"box": "h2b", "from": "the journal"}], "host": "h2"},
            "stderr": ["vmimagemanager: info: (as it was the first time)\n"]}
    journal = Journal(os.path.join(fleet.root, "h2", "state"))  # as the worker keeps a job
    journal.begin(job_id, "h2b", protocol.journal_request("h2b", job.run))
    journal.finish(job_id, "h2b", kept)
    replies = []
    with kombu.Connection(broker.url) as conn:
        reply_q = kombu.Queue(f"vmim.reply.{job_id}", exclusive=True, auto_delete=True)
        with kombu.Consumer(conn, queues=[reply_q], accept=["json"], no_ack=True,
                            callbacks=[lambda body, m: replies.append(body)]):
            kombu.Producer(conn).publish(
                job.encode(),
                exchange=protocol.JOBS, routing_key="box.h2b", reply_to=reply_q.name,
                correlation_id=job_id, content_type="application/json",
                content_encoding="utf-8", serializer=None, delivery_mode=2)
            deadline = time.monotonic() + 30
            while not replies:
                assert time.monotonic() < deadline, "no reply"
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    body = replies[0] if isinstance(replies[0], dict) else json.loads(replies[0])
    assert {k: v for k, v in body.items() if k != "v"} == kept  # v: the protocol's version
    assert not is_mounted(fleet.mount_of("h2b"))  # the job was not run again
    assert "answering from the journal" in fleet.log("h2")


def test_lists_with_no_live_worker_exit_7_with_the_reason(broker):
    """A fleet where no worker runs: -l says so (exit 7); an empty list would read as 'no
    slots'. A virtual host of its own stands for such a fleet. The first client finds nothing
    of the fleet there (it declares what the hosts share): no worker has ever started; the
    next ones get no answer."""
    import subprocess
    import sys

    from tests.fleet.conftest import env, own_vhost

    with own_vhost(broker, "vmim-empty") as url:
        for i, argv in enumerate((["-l"], ["-l", "--json"], ["-f"])):
            res = subprocess.run([sys.executable, "-m", "vmim", "--broker", url, *argv],
                                 capture_output=True, text=True, env=env(), timeout=120)
            assert res.returncode == 7, res
            said = "no worker has ever started at" if i == 0 else "no worker answered at"
            assert said in res.stderr, res.stderr


def test_a_staging_and_its_swap_travel_as_jobs(fleet):
    """--stage and --swap through the broker: the owning host's worker stages into h3b's
    standby disk (its active disk untouched) and swaps it in."""
    write_in(fleet, "h3a", "marker", "staged through the fleet\n")
    st = fleet.vmim("-b", "h3a", "-s", "fleet-staged", "--release")
    assert st.code == 0, st
    before = marker_of(fleet, "h3b")
    r = fleet.vmim("-b", "h3b", "-r", "fleet-staged", "--stage", "--json")
    assert r.code == 0, r
    assert r.json()["host"] == "h3"
    assert [s.get("disk") for s in r.json()["results"][0]["steps"]] == ["standby"] * 4
    assert marker_of(fleet, "h3b") == before  # the active disk: untouched
    row = [b for b in fleet.vmim("-l", "--json").json()["boxes"] if b["name"] == "h3b"][0]
    assert row["staged"]["image"] == "fleet-staged" and row["staged"]["state"] == "ready"
    table = fleet.vmim("-l").out.splitlines()
    assert table[0].split()[-1] == "STAGED"
    row = [line.split() for line in table if line.split()[1:2] == ["h3b"]][0]
    assert row[-2] == "fleet-staged" and row[-1].startswith(time.strftime("%Y-"))
    sw = fleet.vmim("-b", "h3b", "--swap")
    assert sw.code == 0, sw
    assert marker_of(fleet, "h3b") == "staged through the fleet\n"
