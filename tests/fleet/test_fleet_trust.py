"""What a broker client may make a worker do (issue 20, finding 7): the fleet accepts typed,
allow-listed jobs only. The hostile messages are published with kombu directly, by a broker
user with only the client permissions of docs/fleet.md (conftest.Sender)."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.fleet.conftest import add_host_user, is_mounted, marker_of, queue_depth, wait_mounted
from tests.rig import domains  # noqa: F401 - the fixture
from vmim.fleet import protocol


def job_id() -> str:
    return os.urandom(16).hex()


def v2_job(box: str, request=None, options=None, **fields) -> dict:
    """A typed job of the protocol's version (2 and later: vmim/fleet/protocol.py), by hand."""
    body = {"v": protocol.VERSION, "type": "job", "job_id": job_id(), "box": box,
            "deadline": time.time() + 30, "request": request or {"actions": ["mount"]},
            "options": options or {}}
    body.update(fields)
    return body


def v1_job(argv, deadline=None) -> dict:
    """A job of version 1 (an argv), as 1.x clients sent them."""
    return {"v": 1, "job_id": job_id(), "argv": argv,
            "deadline": time.time() + 30 if deadline is None else deadline}


def assert_refused(sender, corr: str, what: str) -> dict:
    reply = sender.result(corr)
    assert reply is not None, f"{what}: no reply ({sender.replies.get(corr)})"
    assert reply["exit_code"] == 2, (what, reply)
    assert reply["doc"]["error"]["message"], (what, reply)
    assert not reply["doc"].get("results"), (what, reply)  # nothing ran
    return reply


def test_the_any_free_queue_takes_any_free_jobs_only(fleet, sender, domains):  # noqa: F811
    """A job on vmim.any that names a box, several boxes or a domain that is not a slot is
    refused, acknowledged and answered; no slot and no other domain of the host is touched."""
    other = domains.define(domains.name("notaslot"), start=True)  # a VM of the host, no slot
    sent = {
        "v1 -k of a non-slot domain": sender.send(v1_job(["-b", other, "-k"])),
        "v1 two boxes": sender.send(v1_job(["-b", "h3a", "-b", "h3b", "--mount"])),
        "v2 a non-slot domain": sender.send(v2_job(other, {"actions": ["kill"]})),
        "v2 a named slot": sender.send(v2_job("h3a")),
        "v2 several boxes": sender.send(v2_job("any-free", {"actions": ["mount"],
                                                            "boxes": ["h3a", "h3b"]})),
        "v2 a box routed to another slot's queue": sender.send(v2_job("h3a"),
                                                               routing_key="box.h3b"),
    }
    sender.wait(list(sent.values()))
    for what, corr in sent.items():
        assert_refused(sender, corr, what)
    assert domains.state(other) == 1  # VIR_DOMAIN_RUNNING: not killed
    assert not any(is_mounted(fleet.mount_of(f"{h}{s}")) for h in ("h1", "h2", "h3")
                   for s in "ab")
    assert queue_depth(fleet.broker, "vmim.any") == 0  # acknowledged, not redelivered
    assert queue_depth(fleet.broker, "vmim.host.h3.box.h3b") == 0


def hostile_messages(box_key: str):
    """(what, body, routing key): malformed jobs of every kind, on the any-free queue and on
    a slot's own queue."""
    nul = v2_job("any-free", {"actions": ["restore"], "restore": "gold\u0000x"})
    big = v1_job(["-b", "any-free", "--mount"] + ["-v"] * 50_000)  # 400 KB
    big2 = v2_job("any-free", {"actions": ["mount", "insert"],
                               "inserts": [{"name": "x" * 400_000, "directory": "/"}]})
    out = []
    for key in ("any", box_key):
        box = "any-free" if key == "any" else box_key.split(".", 1)[1]
        out += [
            ("not JSON", b"{not json", key),
            ("not UTF-8", b"\xff\xfe{}", key),
            ("not an object", b"[1, 2, 3]", key),
            ("a string", b'"job"', key),
            ("unknown version", dict(v2_job(box), v=99), key),
            ("no version", {k: v for k, v in v2_job(box).items() if k != "v"}, key),
            ("non-numeric deadline", v2_job(box, deadline="soon"), key),
            ("infinite deadline", json.dumps(v2_job(box, deadline=1.0))
             .replace('"deadline": 1.0', '"deadline": Infinity'), key),
            ("NaN deadline", json.dumps(v2_job(box, deadline=1.0))
             .replace('"deadline": 1.0', '"deadline": NaN'), key),
            ("huge deadline", json.dumps(v2_job(box, deadline=1.0))
             .replace('"deadline": 1.0', '"deadline": 1e999'), key),
            ("v1 non-numeric deadline", v1_job(["-b", box, "--mount"], "soon"), key),
            ("v1 infinite deadline", v1_job(["-b", box, "--mount"], float("inf")), key),
            ("v1 NUL byte", v1_job(["-b", box, "-r", "gold\u0000x"]), key),
            ("NUL byte", dict(nul, box=box), key),
            ("400 KB v1 argv", big, key),
            ("400 KB string", dict(big2, box=box), key),
            ("unknown field", v2_job(box, {"actions": ["mount"], "config": "/etc/x.cfg"}), key),
            ("unknown option", v2_job(box, options={"config": "/etc/x.cfg"}), key),
            ("wrong type", v2_job(box, {"actions": "mount"}), key),
            ("unknown action", v2_job(box, {"actions": ["format-c"]}), key),
            ("negative number", v2_job(box, options={"timeout": -1}), key),
            ("a float for an int", v2_job(box, options={"lock_wait": 1.5}), key),
            ("a bool for an int", v2_job(box, options={"core": True}), key),
            ("a bad job id", v2_job(box, job_id="../../etc/passwd"), key),
        ]
    return out


def test_malformed_jobs_are_refused_and_acknowledged_and_running_jobs_go_on(fleet, sender,
                                                                             big):
    """Every malformed job gets an answer (exit 2) and is acknowledged; the worker keeps its
    connection and its running restore (which succeeds); a non-JSON message on the control
    fanout changes nothing; the slots those jobs came for serve the next job."""
    at = {h: fleet.log_size(h) for h in ("h1", "h2", "h3")}
    client = fleet.spawn("-b", "h1a", "-r", big, "--release", "--json")
    wait_mounted(fleet.mount_of("h1a"), client)
    sender.send(b"\x00not json at all", exchange="vmim.control", routing_key="")
    sender.send(b"[]", exchange="vmim.control", routing_key="")
    sent = {f"{what} on {key}": sender.send(body, routing_key=key)
            for what, body, key in hostile_messages("box.h1b")}
    no_reply = sender.send(b"{not json", routing_key="box.h1b", reply_to=None)
    bad_reply = sender.send(v2_job("h1b"), routing_key="box.h1b", reply_to="amq.rabbitmq.x")
    sender.wait(list(sent.values()), timeout=60)
    for what, corr in sent.items():
        assert_refused(sender, corr, what)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, (out, err)  # the running restore went on and succeeded
    assert json.loads(out)["results"][0]["box"] == "h1a"
    assert no_reply not in sender.replies and bad_reply not in sender.replies
    for h in ("h1", "h2", "h3"):
        log = fleet.log(h)[at[h]:]
        assert "internal error" not in log and "lost the broker" not in log, log
        assert fleet.workers[h].poll() is None
    for q in ("vmim.any", "vmim.host.h1.box.h1b"):
        assert queue_depth(fleet.broker, q) == 0  # acknowledged, not redelivered
    # the slots the bad jobs came for are not reserved: the next job runs at once
    r = fleet.vmim("-b", "h1b", "--mount", "--lock-wait", "10")
    assert r.code == 0, r
    assert fleet.vmim("-b", "h1b", "--release").code == 0
    assert marker_of(fleet, "h1a") == "big\n"  # the restore is whole


def test_a_job_cannot_forge_a_line_of_the_workers_log(fleet, sender):
    """A refused job's fields are quoted in the worker's log: a newline or a terminal control
    in them does not start a line of the log or reach its reader's terminal."""
    forged = "2026-12-06 12:00:00 vmimagemanager: info: forged"
    at = fleet.log_size("h3")
    corrs = [sender.send(v2_job("h3a", type="job\n" + forged), routing_key="box.h3a"),
             sender.send(dict(v2_job("h3a"), **{"x\n" + forged: 1}), routing_key="box.h3a"),
             sender.send(v2_job("h3a", type="job\x1b]52;c;eA==\x07"), routing_key="box.h3a")]
    sender.wait(corrs)
    for corr in corrs:
        assert_refused(sender, corr, "a forging job")
    log = fleet.log("h3")[at:]
    assert log.count("refusing a job") == 3, log
    assert "\\n" + forged[:20] in log, log  # quoted, on the record's line
    assert not any(line.startswith(forged[:10]) for line in log.splitlines()), log
    assert "\x1b" not in log and "\\x1b]52" in log, log


def test_a_reply_queue_that_is_not_a_clients_is_not_written(fleet, sender):
    """reply_to must name a client reply queue (vmim.reply.*): a job cannot make a worker
    publish into another queue (a host's slot queue, say) through the default exchange."""
    corr = sender.send(v2_job("any-free"), reply_to="vmim.host.h2.box.h2a")
    sender.wait([corr], timeout=3)
    assert corr not in sender.replies
    assert queue_depth(fleet.broker, "vmim.host.h2.box.h2a") == 0
    assert queue_depth(fleet.broker, "vmim.any") == 0
    assert not any(is_mounted(fleet.mount_of(f"{h}{s}")) for h in ("h1", "h2", "h3")
                   for s in "ab")


def evil_host(broker) -> tuple:
    """A compromised host `ev<pid>` serving slot `evila`: its user with the permissions of
    docs/fleet.md (vmim.fleet.permissions); (name, broker URL)."""
    host = f"ev{os.getpid()}"
    return host, add_host_user(broker, host, ["evila"], "pw-ev")


def attempt(conn, what: str, act, done: list, refused: list) -> None:
    """act(channel) on a channel of its own (a refusal closes it): `what` goes to `done`, or
    with the broker's words to `refused` when it answers 403."""
    import amqp

    try:
        act(conn.channel())
    except amqp.exceptions.AccessRefused as exc:
        refused.append((what, str(exc)))
    else:
        done.append(what)


def test_a_host_user_cannot_send_jobs_to_another_hosts_slots_by_the_default_exchange(
        fleet, sender):
    """A host's user may write on amq.default (to answer clients), and RabbitMQ checks a
    publish against its exchange only: through the default exchange it reached any queue by
    name — another host's slot queue too, with a job whose reply_to is a client's queue it
    learned (from an any-free job it took). The worker ran it: a compromised host re-imaged
    the slots of every host. A job is taken only from the jobs exchange (which only clients
    may write), with its slot's routing key, whatever queue it came through."""
    import kombu

    broker = fleet.broker
    user, url = evil_host(broker)
    try:
        with kombu.Connection(url) as conn:
            producer = kombu.Producer(conn.channel())
            body = v2_job("h1a")
            producer.publish(json.dumps(body).encode(), exchange="",
                             routing_key=protocol.box_queue("h1", "h1a"),
                             reply_to=sender.reply_to, correlation_id=body["job_id"],
                             content_type="application/json", content_encoding="utf-8",
                             serializer=None, delivery_mode=2)
        sender.wait([body["job_id"]], timeout=30)
        mounted = is_mounted(fleet.mount_of("h1a"))
    finally:
        broker.ctl("delete_user", user)
        if is_mounted(fleet.mount_of("h1a")):
            fleet.vmim("-b", "h1a", "--release")
    assert not mounted
    reply = assert_refused(sender, body["job_id"], "a job through amq.default")
    assert protocol.JOBS in reply["doc"]["error"]["message"]
    assert not [r for r in sender.replies[body["job_id"]] if r.get("type") == "accepted"]
    assert queue_depth(fleet.broker, "vmim.host.h1.box.h1a") == 0


def test_a_host_user_cannot_see_the_jobs_of_another_hosts_slots(fleet, sender):
    """A host's user needs read on the jobs exchange to bind its own slot queues; on the
    direct exchange of earlier releases it could bind a queue of its own with any routing key
    and got a copy of every box's job (its request, its client's reply queue), or took them
    under its own slot's queue. On the topic exchange the broker checks each binding's key
    against the host's topic permissions (docs/fleet.md): only its own slots' keys and `any`.
    Every other key — another host's box, the wildcards, an exchange of its own bound in
    between — is refused (403), and the job of another host's box reaches no queue of it."""
    import kombu

    broker = fleet.broker
    user, url = evil_host(broker)
    jobs = kombu.Exchange(protocol.JOBS, type=protocol.JOBS_TYPE, durable=True, passive=True)
    refused, bound = [], []
    try:
        with kombu.Connection(url) as conn:
            for i, key in enumerate(("box.h2a", "#", "*.h2a", "box.*", "box.#", "box.evila.#")):
                # a name its user may make (its probe queues'): the binding is what is refused
                q = kombu.Queue(f"vmim.host.{user}.probe.{i:08x}", jobs, routing_key=key,
                                exclusive=True, auto_delete=True)
                attempt(conn, key, lambda ch, q=q: q(ch).declare(), bound, refused)

            def exchange_between(ch):  # an exchange of its own (its name is one it may make)
                own = kombu.Exchange(f"vmim.host.{user}.probe.ff", type="fanout",
                                     auto_delete=True)
                own(ch).declare()
                ch.exchange_bind(own.name, protocol.JOBS, routing_key="box.h2a")

            attempt(conn, "exchange-to-exchange box.h2a", exchange_between, bound, refused)
            own = kombu.Queue(f"vmim.host.{user}.box.evila", jobs, routing_key="box.evila",
                              exclusive=True, auto_delete=True)
            attempt(conn, "its own slot", lambda ch: own(ch).declare(), bound, refused)
            corr = sender.send(v2_job("h2a", deadline=1e12 + 1), routing_key="box.h2a")
            sender.wait([corr], timeout=30)  # refused (the deadline): nothing runs
            copied = own(conn.channel()).get(no_ack=True)
    finally:
        broker.ctl("delete_user", user)
    assert bound == ["its own slot"], (bound, refused)
    assert len(refused) == 7 and all("ACCESS_REFUSED" in why for _, why in refused), refused
    assert all(protocol.JOBS in why for _, why in refused), refused
    assert copied is None, "a host's user got a copy of another host's job"
    assert sender.result(corr) is not None  # the job itself reached its own host


def test_a_host_cannot_answer_in_the_name_of_another_host(fleet, big):
    """A worker's replies carry the AMQP user_id, which the broker checks against the
    connection's user; the client believes a reply in the name of host H only from H's user.
    A compromised host that learned a client's reply queue and job id (from an any-free job
    of it, say; here a spy of the test's own copies the job) answers in the name of the host
    that runs the job: the client refuses the forged reply, exit 7 naming the host and the
    user, and prints no result from it. With the user_id of the host it claims to be, the
    broker refuses the publish itself (406)."""
    import amqp
    import kombu

    broker = fleet.broker
    user, url = evil_host(broker)
    client = None
    lied = ""
    try:
        with kombu.Connection(broker.url) as spy_conn:  # guest: no topic permissions
            jobs = kombu.Exchange(protocol.JOBS, type=protocol.JOBS_TYPE, durable=True)
            spy = kombu.Queue(f"spy.{os.getpid()}", jobs, routing_key="box.h1a",
                              exclusive=True, auto_delete=True)(spy_conn.channel())
            spy.declare()
            client = fleet.spawn("-b", "h1a", "-r", big, "--json")
            deadline = time.monotonic() + 30
            while (job := spy.get(no_ack=True)) is None:
                assert time.monotonic() < deadline, "the job was never published"
                time.sleep(0.02)
        job_id, reply_to = job.properties["correlation_id"], job.properties["reply_to"]
        with kombu.Connection(url) as conn:
            try:
                forge_result(conn.channel(), job_id, reply_to, "h1", "h1a", "h1")
                conn.drain_events(timeout=5)
            except (amqp.exceptions.PreconditionFailed, TimeoutError) as exc:
                lied = str(exc)
            forge_result(conn.channel(), job_id, reply_to, "h1", "h1a", user)
        out, err = client.communicate(timeout=120)
    finally:
        broker.ctl("delete_user", user)
        if client is not None and client.poll() is None:
            client.kill()
            client.communicate()
        fleet.vmim("-b", "h1a", "--release", "--lock-wait", "120")
    assert "PRECONDITION_FAILED" in lied, lied
    assert client.returncode == 7, (out, err)
    assert "in the name of host h1" in err and f"broker user {user}" in err, err
    assert "forged" not in out


def _peak_rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_compressed_message_is_never_inflated_by_a_worker(fleet, sender):
    """kombu inflates a body whose `compression` header names a codec (zlib, bz2, lzma)
    before anyone sees it: a list request of 400 KB on the vmim.control fanout made every
    worker of the fleet hold 400 MiB (a body the broker takes inflates a thousandfold: gigabytes
    in the memory of root on each hypervisor), before the size limit of a message was checked.
    Workers take the body as it came: compressed, it is no JSON, and refused."""
    import zlib

    size = 400 << 20
    z = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    bomb = b"".join(z.compress(chunk) for _ in range(size >> 20)) + z.flush()
    assert len(bomb) < 1 << 20
    pids = {h: p.pid for h, p in fleet.workers.items()}
    before = {h: _peak_rss_mib(pid) for h, pid in pids.items()}
    start = {h: fleet.log_size(h) for h in pids}
    for exchange, key in (("vmim.control", ""), (protocol.JOBS, "box.h1a"), (protocol.JOBS, "any")):
        sender.producer.publish(bomb, exchange=exchange, routing_key=key,
                                reply_to=sender.reply_to, correlation_id=job_id(),
                                headers={"compression": "application/x-gzip"},
                                content_type="application/json", content_encoding="binary",
                                serializer=None)
    for h in pids:  # each worker read the list request (and ignored it)
        fleet.wait_log(h, "ignoring a list request", start[h], timeout=60)
    fleet.wait_log("h1", "refusing a job", start["h1"], timeout=60)
    grown = {h: _peak_rss_mib(pid) - before[h] for h, pid in pids.items()}
    assert all(g < 100 for g in grown.values()), grown
    assert queue_depth(fleet.broker, "vmim.host.h1.box.h1a") == 0
    assert queue_depth(fleet.broker, "vmim.any") == 0


def test_a_host_user_cannot_delete_or_declare_again_what_every_host_shares(fleet, broker):
    """What every host shares — the jobs exchange, the control fanout, vmim.any — is declared
    by the clients. A host's user that could declare them could also delete them (no job,
    no list for any host until a worker connects again), or declare the jobs exchange again
    as a fanout, which no topic permission guards, and take a copy of every host's jobs.
    Each attempt is refused (403); they stay as declared, and the fleet goes on."""
    import kombu

    user, url = evil_host(broker)
    attempts = {
        "delete the jobs exchange": lambda ch: ch.exchange_delete(protocol.JOBS),
        "delete the control fanout": lambda ch: ch.exchange_delete(protocol.CONTROL),
        "delete vmim.any": lambda ch: ch.queue_delete(protocol.ANY_QUEUE),
        "declare the jobs exchange as a fanout": lambda ch: ch.exchange_declare(
            protocol.JOBS, "fanout", durable=True, auto_delete=False),
        "declare vmim.any again": lambda ch: ch.queue_declare(
            protocol.ANY_QUEUE, durable=True, auto_delete=False),
    }
    done, refused = [], []
    try:
        with kombu.Connection(url) as conn:
            for what, act in attempts.items():
                attempt(conn, what, act, done, refused)
    finally:
        broker.ctl("delete_user", user)
    assert done == [], done
    assert len(refused) == len(attempts), refused
    exchanges = {tuple(line.split()) for line in
                 broker.ctl("list_exchanges", "name", "type").stdout.splitlines()}
    assert {(protocol.JOBS, "topic"), (protocol.CONTROL, "fanout")} <= exchanges, exchanges
    bindings = {tuple(line.split()) for line in broker.ctl(
        "list_bindings", "source_name", "destination_name", "routing_key").stdout.splitlines()}
    assert (protocol.JOBS, protocol.ANY_QUEUE, protocol.ANY_KEY) in bindings, bindings
    lists = fleet.vmim("-l", "--json")
    assert lists.code == 0, lists
    assert {"h1", "h2", "h3"} <= {b["host"] for b in lists.json()["boxes"]}, lists.out


def test_a_worker_waits_for_a_client_to_declare_what_every_host_shares(broker, tmp_path):
    """On a broker where nothing of the fleet is declared yet, a worker whose user has the
    host permissions of docs/fleet.md may not declare the shared objects: it says it waits,
    once, and looks again every second on its connection; told to stop meanwhile, it stops
    (exit 0). A client whose user may not
    declare them either (the client permissions of earlier releases) exits 7 saying so; the
    first client that may declares them, gives waiting workers a moment to bind, and lists
    the worker."""
    import subprocess
    import sys

    from tests.fleet.conftest import add_client_user, env, one_slot_worker, own_vhost, stop_process
    from vmim.fleet import permissions

    host = f"hw{os.getpid()}"
    users = {}
    worker = None
    with own_vhost(broker, "vmim-fresh") as guest_url:
        vhost = guest_url.rsplit("/", 1)[1]
        try:
            old_grants = (r"^vmim\.reply\..*",
                          r"^(vmim\.jobs\.topic|vmim\.control)$|^amq\.default$",
                          r"^vmim\.reply\..*")
            for user, grants in ((host, permissions.host_grants(host, ["pw1"])),
                                 ("ci-old", old_grants)):
                broker.ctl("delete_user", user)
                assert broker.ctl("add_user", user, f"pw-{user}").returncode == 0
                users[user] = f"amqp://{user}:pw-{user}@127.0.0.1:{broker.port}/{vhost}"
                assert broker.ctl("set_permissions", "-p", vhost, user, *grants).returncode == 0
            assert broker.ctl("set_topic_permissions", "-p", vhost, host, protocol.JOBS,
                              *permissions.host_topic_grants(["pw1"])).returncode == 0
            users["ci-new"] = add_client_user(broker, "ci-new", "pw-ci-new", vhost)
            log = tmp_path / "worker.log"
            worker = one_slot_worker(tmp_path, "pw1", users[host], host, log)

            def wait_for(text: str) -> None:
                deadline = time.monotonic() + 30
                while text not in log.read_text():
                    assert time.monotonic() < deadline and worker.poll() is None, log.read_text()
                    time.sleep(0.1)

            def client(user, *argv):
                return subprocess.run([sys.executable, "-m", "vmim", "--broker", users[user],
                                       *argv], capture_output=True, text=True, env=env(),
                                      timeout=120)

            wait_for(f"worker {host}: waiting: the fleet's exchanges")
            time.sleep(2.5)  # it looks again meanwhile, and says so once
            text = log.read_text()
            assert f"worker {host}: ready" not in text and text.count("waiting:") == 1, text
            # told to stop while it waits (systemctl stop): it stops at its next look
            worker.terminate()
            assert worker.wait(10) == 0, log.read_text()
            assert f"worker {host} stopped" in log.read_text()
            worker = one_slot_worker(tmp_path, "pw1", users[host], host, log)
            wait_for(f"worker {host}: waiting: the fleet's exchanges")
            old = client("ci-old", "-l")
            assert old.returncode == 7, old
            assert "user ci-old may not declare them" in old.stderr, old.stderr
            first = client("ci-new", "-l", "--json")
            assert first.returncode == 0, first
            assert "declared the fleet's exchanges" in first.stderr, first.stderr
            boxes = json.loads(first.stdout)["boxes"]
            assert (host, "pw1") in {(b["host"], b["name"]) for b in boxes}
            assert f"worker {host}: ready" in log.read_text()
            assert "may declare and delete what every host shares" not in log.read_text()
        finally:
            if worker is not None:
                stop_process(worker)
            for user in users:
                broker.ctl("delete_user", user)


def test_a_client_user_reads_the_jobs_exchange_only_to_bind_vmim_any(fleet, sender):
    """A client's user may read the jobs exchange and write vmim.any: it declares vmim.any and
    binds it with key `any`. Its topic permissions refuse every other key: vmim.any bound
    with `#` or another host's box key would take the jobs of every box (any host's worker
    then gets them as malformed any-free jobs, or a client user copies them). The queues a
    client owns it may not bind at all (no write on them)."""

    refused, bound = [], []
    for queue, key in ((protocol.ANY_QUEUE, "#"), (protocol.ANY_QUEUE, "box.h2a"),
                       (protocol.ANY_QUEUE, "*.*"), (sender.reply_to, protocol.ANY_KEY),
                       (protocol.ANY_QUEUE, protocol.ANY_KEY)):
        attempt(sender.conn, key, lambda ch, q=queue, k=key: ch.queue_bind(q, protocol.JOBS, k),
                bound, refused)
    assert [k for k, _ in refused] == ["#", "box.h2a", "*.*", protocol.ANY_KEY], refused
    assert all("topic" in why for _, why in refused[:3]), refused  # the topic check
    assert bound == [protocol.ANY_KEY]  # vmim.any's own binding, there already
    bindings = broker_bindings(fleet.broker, protocol.ANY_QUEUE)
    assert bindings == {protocol.ANY_KEY}, bindings


def broker_bindings(broker, queue: str) -> set:
    """The routing keys binding `queue` to the jobs exchange."""
    out = broker.ctl("list_bindings", "source_name", "destination_name", "routing_key").stdout
    return {parts[2] for parts in (line.split() for line in out.splitlines())
            if len(parts) == 3 and parts[0] == protocol.JOBS and parts[1] == queue}


def test_a_jobs_exchange_declared_otherwise_is_said_not_used(broker):
    """A jobs exchange declared again as a fanout (what a host's user could do under the
    permissions of earlier releases) is seen by the client, which declares it again as it
    should be — a passive declare does not compare types: exit 7, saying what to delete."""
    import subprocess
    import sys

    import kombu

    from tests.fleet.conftest import env, own_vhost

    with own_vhost(broker, "vmim-fanout") as url:
        with kombu.Connection(url) as conn:
            channel = conn.channel()
            channel.exchange_declare(protocol.JOBS, "fanout", durable=True, auto_delete=False)
            channel.exchange_declare(protocol.CONTROL, "fanout", durable=True,
                                     auto_delete=False)
            channel.queue_declare(protocol.ANY_QUEUE, durable=True, auto_delete=False)
        res = subprocess.run([sys.executable, "-m", "vmim", "--broker", url, "-l"],
                             capture_output=True, text=True, env=env(), timeout=120)
        assert res.returncode == 7, res
        assert "declared otherwise" in res.stderr and protocol.JOBS in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_a_jobs_exchange_deleted_and_declared_again_gets_the_slot_queues_back(fleet, broker):
    """The jobs exchange is deleted (by a client's user, which may, or an admin) and the next
    client declares it anew — without the bindings of the hosts' slot queues, and the broker
    tells no consumer. Every box was "unknown" until each worker reconnected; a worker binds
    its slot queues again every topology.REBIND seconds, so a box's job runs again soon."""
    import kombu

    from vmim.fleet import topology

    with kombu.Connection(broker.url) as conn:
        conn.channel().exchange_delete(protocol.JOBS)
    fleet.wait_log("h1", "is gone (deleted)", timeout=3 * topology.REBIND)
    deadline = time.monotonic() + 3 * topology.REBIND
    while True:  # each client declares the exchange again (vmim.fleet.topology)
        r = fleet.vmim("-b", "h1b", "--dry-run", "--mount", "--json")
        if r.code == 0 or time.monotonic() > deadline:
            break
        assert "unknown box" in r.err, r
        time.sleep(1)
    assert r.code == 0, r
    assert r.json()["host"] == "h1", r.out
    assert "is back: slot queues bound again" in fleet.log("h1")


def test_a_reply_queue_that_refuses_every_reply_costs_the_worker_nothing(fleet, sender):
    """A client user may declare a reply queue of its own, with the arguments it likes: one of
    length 0 and reject-publish makes the broker nack every reply into it. On e8a7946 the nack
    raised in the worker, which dropped its connection and aborted every job of the host: one
    list request on the fanout did that to every worker, and a job with that reply queue came
    back after each reconnect, without end. Now a refused reply is the client's loss only."""
    q = f"vmim.reply.{os.urandom(16).hex()}"
    sender.channel.queue_declare(queue=q, durable=False, auto_delete=False, arguments={
        "x-max-length": 0, "x-overflow": "reject-publish"})
    at = {h: fleet.log_size(h) for h in ("h1", "h2", "h3")}
    try:
        sender.send({"v": protocol.VERSION, "type": "lists", "job_id": job_id(),
                     "lists": ["boxes"]}, exchange=protocol.CONTROL, routing_key="", reply_to=q)
        sender.send(v2_job("h3b"), routing_key="box.h3b", reply_to=q)
        for h in ("h1", "h2", "h3"):
            fleet.wait_log(h, f"refused a reply to {q}", at[h], timeout=60)
        fleet.wait_log("h3", "its client is gone; not running it", at["h3"], timeout=60)
        assert queue_depth(fleet.broker, "vmim.host.h3.box.h3b") == 0  # acknowledged
        r = fleet.vmim("-b", "h3a", "--mount", "--release", "--json")  # another client's job
        assert r.code == 0, r
        for h in ("h1", "h2", "h3"):
            text = fleet.log(h)[at[h]:]
            assert "reconnecting" not in text and "internal error" not in text, (h, text)
            assert text.count(": ready") == 0, (h, text)  # never connected again
        assert not is_mounted(fleet.mount_of("h3b"))
    finally:
        sender.channel.queue_delete(q)


def forge_result(channel, job_id: str, reply_to: str, host: str, box: str,
                 user_id: str) -> None:
    """Publish on channel a result of job_id for box that says it ran (exit 0), as host,
    with the AMQP user_id user_id."""
    import kombu

    forged = {"v": protocol.VERSION, "type": "result", "host": host, "box": box,
              "exit_code": 0, "doc": {"results": [{"box": box, "forged": True}]},
              "stderr": []}
    kombu.Producer(channel).publish(
        json.dumps(forged).encode(), exchange="", routing_key=reply_to,
        correlation_id=job_id, user_id=user_id, serializer=None,
        content_type="application/json", content_encoding="utf-8")


@pytest.mark.parametrize("claim", ["another host's slot", "its own slot, queue exclusive"])
def test_a_host_cannot_claim_another_hosts_slot_for_an_any_free_job(fleet, claim):
    """Any host may take an any-free job (it reads vmim.any). A compromised one answered it, as
    itself, naming another host's slot h1a: on e8a7946 the client printed h1a and exit 0. The
    broker knows each host's slots (only the host's user may declare its slot queues, named
    one by one in its permissions): the claim is refused, exit 7. A claim of its own slot is
    believed, also when the host declared that queue exclusive (the broker then answers the
    client's look-up RESOURCE_LOCKED: on the main of 2026-12-07 an internal error)."""
    import kombu

    broker = fleet.broker
    host, url = evil_host(broker)
    box = "h1a" if claim == "another host's slot" else "evila"
    slots = [f"{h}{s}" for h in ("h1", "h2", "h3") for s in "ab"]
    client = None
    try:
        for slot in slots:  # no free slot: no worker takes the any-free job
            assert fleet.vmim("-b", slot, "--mount").code == 0
        time.sleep(2)
        client = fleet.spawn("-b", "any-free", "--mount", "--lock-wait", "60")
        with kombu.Connection(url) as conn:
            channel = conn.channel()
            if box == "evila":
                kombu.Queue(protocol.box_queue(host, box), exclusive=True)(channel).declare()
            deadline = time.monotonic() + 30
            while (job := channel.basic_get(protocol.ANY_QUEUE)) is None:
                assert time.monotonic() < deadline, "the any-free job never came"
                time.sleep(0.05)
            channel.basic_ack(job.delivery_tag)
            forge_result(channel, job.properties["correlation_id"], job.properties["reply_to"],
                         host, box, host)
            out, err = client.communicate(timeout=60)
    finally:
        broker.ctl("delete_user", host)
        if client is not None and client.poll() is None:
            client.kill()
            client.communicate()
        released = [fleet.vmim("-b", slot, "--release") for slot in slots]
    if box == "h1a":
        assert client.returncode == 7, (out, err)
        assert f"host {host} answered" in err and "not one of its slots" in err, err
        assert "h1a" not in out
    else:
        assert client.returncode == 0, (out, err)
        assert out == "evila\n", (out, err)
    assert all(r.code == 0 for r in released), released
