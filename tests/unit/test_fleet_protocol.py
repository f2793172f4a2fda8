"""The fleet's job protocol and journal, without a broker."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from vmim.cli import build_parser, make_invocation
from vmim.errors import ProtocolError, UsageError
from vmim.fleet import protocol, transport
from vmim.fleet.journal import Journal
from vmim.invocation import OPTION_FIELDS, BoxRun, RunOptions
from vmim.plan import REQUEST_FIELDS, Request


def invocation(*argv: str):
    return make_invocation(build_parser().parse_args(list(argv)))


def job_of(*argv: str, box: str = "web1") -> protocol.Job:
    inv = invocation(*argv)
    run = BoxRun(replace(inv.request, boxes=(), lists=()), inv.options)
    return protocol.Job(protocol.new_job_id(), box, time.time() + 30, run, "client1")


@pytest.mark.parametrize("argv", [
    ["-b", "web1", "-r", "golden", "-i", "certs:/etc/ssl", "-u", "--core", "2"],
    ["-b", "web1", "-d", "--timeout", "30", "-e", "logs:/var/log", "--zstd", "--release"],
    ["-b", "web1", "-s", "img-{box}", "-w", "--dry-run", "-q"],
    ["-b", "any-free", "--mount", "-v", "--disk-image", "-r", "disk"],
])
def test_a_job_carries_the_same_request(argv):
    client = [*argv, "--broker", "amqp://x//", "--json", "--lock-wait", "9", "--config", "/c.cfg"]
    job = job_of(*client)
    body = job.encode()
    got = protocol.decode_job(body, job.box)
    assert got == job
    assert replace(got.run.request, boxes=invocation(*argv).request.boxes) == \
        invocation(*argv).request
    assert got.run.options.lock_wait == 9
    for word in (b"amqp://", b"/c.cfg", b"broker", b"config"):
        assert word not in body


#: options of the command line that stay on the client, by construction: a job has no field
#: for them (anything else is carried by the typed request or its options)
LOCAL_ONLY = {"help", "version", "config", "connect", "print_config", "log_config", "syslog",
              "broker", "local", "lvm"}
#: how the carried ones are named in the typed values
CARRIED = {"box": "boxes", "kill": "actions", "down": "actions", "mount": "actions",
           "extract": "extracts", "extract_directory": "extracts", "store": "store",
           "restore": "restore", "insert": "inserts", "release": "actions",
           "redefine": "actions", "swap": "actions", "up": "actions", "stage": "stage",
           "list_boxes": "lists", "list_images": "lists", "list_inserts": "lists",
           "list_free": "lists", "list_locked": "lists", "format": "format",
           "disk_image": "disk_image", **{k: k for k in OPTION_FIELDS}}


def test_every_cli_option_is_carried_by_the_typed_request_or_stays_local():
    dests = {a.dest for a in build_parser()._actions}
    unknown = dests - LOCAL_ONLY - set(CARRIED)
    assert not unknown, f"options neither carried by a job nor local-only: {unknown}"
    for dest, name in CARRIED.items():
        assert name in REQUEST_FIELDS or name in OPTION_FIELDS, (dest, name)
    assert not LOCAL_ONLY & (set(REQUEST_FIELDS) | set(OPTION_FIELDS) | set(protocol.JOB_FIELDS))


def _body(**change):
    body = json.loads(job_of("-b", "web1", "-u").encode())
    for k, v in change.items():
        if "." in k:
            outer, inner = k.split(".")
            body[outer][inner] = v
        else:
            body[k] = v
    return json.dumps(body)


@pytest.mark.parametrize("field", sorted(LOCAL_ONLY | {"argv"}))
@pytest.mark.parametrize("where", ["", "request.", "options."])
def test_a_job_may_not_carry_client_options(field, where):
    """Every local-only option of the command line is refused in a job, wherever it is put."""
    with pytest.raises(ProtocolError) as exc:
        protocol.decode_job(_body(**{where + field: "/etc/other.cfg"}), "web1")
    assert "unknown field" in str(exc.value)


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (b'"job"', "not a JSON object"),
    (b"[" * 50000 + b"]" * 50000, "bytes, more than"),
    (b"[" * 20000 + b"]" * 20000, "not JSON"),
    (_body(v=1), "version 1; this worker speaks version 3"),
    (_body(v=None), "version (none)"),
    (_body(type="lists"), "not one of"),
    (_body(deadline="soon"), "not a number"),
    (_body(deadline=True), "not a number"),
    (_body(deadline=1.0).replace('"deadline": 1.0', '"deadline": Infinity'), "Infinity"),
    (_body(deadline=1.0).replace('"deadline": 1.0', '"deadline": NaN'), "NaN"),
    (_body(deadline=1.0).replace('"deadline": 1.0', '"deadline": 1e999'), "outside"),
    (_body(deadline=-5), "outside"),
    (_body(job_id="../../etc/passwd"), "32 hexadecimal"),
    (_body(box="a\0b"), "NUL byte"),
    (_body(box="x" * 300), "longer than"),
    (_body(**{"request.restore": "gold\0en"}), "NUL byte"),
    (_body(**{"request.inserts": [{"name": "x" * 5000, "directory": "/"}]}), "longer than"),
    (_body(**{"request.inserts": [{"name": "x", "directory": "/"}] * 65}), "more than 64"),
    (_body(**{"request.inserts": [{"name": "x"}]}), "directory is missing"),
    (_body(**{"request.inserts": ["x"]}), "not an object"),
    (_body(**{"request.actions": "up"}), "not a list"),
    (_body(**{"request.actions": ["up", "format-c"]}), "not one of"),
    (_body(**{"request.actions": []}), "no action"),
    (_body(**{"request.format": "zip"}), "not one of"),
    (_body(**{"request.boxes": ["a", "b"]}), "unknown field"),
    (_body(**{"request.lists": ["boxes"]}), "unknown field"),
    (_body(**{"options.timeout": -1}), "outside"),
    (_body(**{"options.lock_wait": 1.5}), "whole number"),
    (_body(**{"options.core": True}), "whole number"),
    (_body(**{"options.verbose": 50000}), "outside"),
    (_body(**{"options.dry_run": "yes"}), "true or false"),
    (_body(request=[]), "not an object"),
    (_body(**{"request.actions": ["store"]}), "do not go together"),
    (_body(**{"request.actions": ["restore"], "request.restore": "../x"}), "is not allowed"),
    (_body(**{"request.actions": ["insert"],
              "request.inserts": [{"name": "certs", "directory": ""}]}), "directory is empty"),
    (_body(**{"request.actions": ["insert"], "request.disk_image": True,
              "request.inserts": [{"name": "certs", "directory": "/"}]}), "disk-image"),
    (_body(deadline=10 ** 400), "outside"),
    (_body(**{"request.actions": ["store", "restore"], "request.store": "gold",
              "request.restore": "gold"}), "would replace the image"),
    (_body(**{"request.actions": ["restore"], "request.restore": "gold\ud800"}),
     "lone surrogate"),
    (_body(**{"request.actions": ["insert"],
              "request.inserts": [{"name": "x", "directory": "/\ud800"}]}), "lone surrogate"),
])
def test_a_malformed_job_is_a_protocol_error(body, words):
    with pytest.raises(ProtocolError) as exc:
        protocol.decode_job(body, "web1")
    assert words in str(exc.value)


def test_a_job_is_checked_as_the_command_line_checks_it():
    """One rule for both (Request.combination_problem): what the command line refuses with
    exit 2, a worker refuses. On e8a7946 a job storing and restoring one name ran: the store
    replaced the golden image with the slot's content."""
    for argv, box in ((["-b", "web1", "-s", "gold", "-r", "gold"], "web1"),
                      (["-b", "any-free", "-r", "gold", "--stage"], "any-free")):
        with pytest.raises(UsageError) as local:
            make_invocation(build_parser().parse_args(argv))
        body = _body(box=box, request={"actions": ["restore"], "restore": "gold",
                                       **({"actions": ["store", "restore"], "store": "gold"}
                                          if "-s" in argv else {"stage": True})})
        with pytest.raises(ProtocolError) as remote:
            protocol.decode_job(body, box)
        assert str(local.value) in str(remote.value)


def test_a_jobs_box_is_the_box_of_its_queue():
    """A job on the shared any-free queue is an any-free job, a job on a slot's queue is
    for that slot: by construction, whatever the message says."""
    assert protocol.decode_job(job_of("-b", "x", "-u", box="any-free").encode(),
                               "any-free").box == "any-free"
    for box, queue, words in (("web1", "any-free", "is an any-free job"),
                              ("any-free", "web1", "came on the queue of box 'web1'"),
                              ("web2", "web1", "came on the queue of box 'web1'")):
        with pytest.raises(ProtocolError) as exc:
            protocol.decode_job(job_of("-b", "x", "-u", box=box).encode(), queue)
        assert words in str(exc.value)


def test_a_list_request_is_read_strictly():
    req = protocol.ListRequest(protocol.new_job_id(), ("boxes", "free"))
    assert protocol.decode_list_request(req.encode()) == req
    for bad in (b"\x00", b"[]", json.dumps({"v": 2, "type": "lists", "job_id": req.job_id,
                                             "lists": ["boxes", "/etc/passwd"]}).encode()):
        with pytest.raises(ProtocolError):
            protocol.decode_list_request(bad)


def test_replies_go_only_to_client_reply_queues():
    assert protocol.usable_reply_to("vmim.reply." + "a" * 32)
    for bad in ("vmim.host.h2.box.h2a", "amq.rabbitmq.reply-to", "vmim.reply.x", None, 3,
                "vmim.reply." + "a" * 32 + "\n"):
        assert protocol.usable_reply_to(bad) is None


def test_replies_round_trip():
    r = protocol.Reply("result", "h1", box="web1", exit_code=4, doc={"results": []},
                       stderr=("a\n",))
    assert protocol.decode_reply(r.encode()) == r
    assert protocol.decode_journal_reply(r.as_dict(), "h1") == r
    assert protocol.decode_journal_reply(["x"], "h1").exit_code == 1
    err = protocol.error_result("no", "h1")
    assert err.exit_code == 2 and err.doc["error"]["message"] == "no"


def test_child_command_runs_the_child_with_the_workers_config():
    cmd = protocol.child_command("/etc/w.cfg")
    assert cmd[1:] == ["-m", "vmim.fleet.child", "--config", "/etc/w.cfg"]


def test_the_child_reads_the_typed_run_and_runs_it_here_with_the_workers_config():
    from vmim.fleet.child import read_invocation

    run = BoxRun(Request(boxes=("web1",), actions=("mount",)), RunOptions(lock_wait=3))
    inv = read_invocation(json.dumps(run.to_dict()), "/etc/w.cfg")
    assert inv.config == "/etc/w.cfg" and inv.local and inv.options.json
    assert inv.request == run.request and inv.options.lock_wait == 3
    with pytest.raises(ProtocolError):
        read_invocation(json.dumps(dict(run.to_dict(), broker="amqp://x//")), "/c")


def test_a_job_thread_that_fails_still_answers_and_frees_the_slot(tmp_path, monkeypatch):
    """Whatever goes wrong in a job thread, the client gets a result, the message is
    acknowledged and the slot's reservation ends (before: the thread died, the slot stayed
    reserved for the worker's lifetime and the message unacknowledged)."""
    from types import SimpleNamespace

    from vmim.fleet import worker as worker_mod

    cfg = SimpleNamespace(statedir=str(tmp_path), slots=[], slot_names=["web1"], path="/c")
    w = worker_mod.Worker(cfg, transport.BrokerSpec("amqp://x//"), "h1")
    sent = []
    monkeypatch.setattr(w, "_send", lambda reply_to, corr, reply, mandatory=False:
                        sent.append(reply) or True)

    def broken(job, host, on_line):
        raise ValueError("embedded null byte")

    monkeypatch.setattr(w.children, "job_reply", broken)
    acks = []
    job = worker_mod.Job(job_id=protocol.new_job_id(), box="web1", run=BoxRun(),
                         reply_to="vmim.reply." + "a" * 32,
                         message=SimpleNamespace(ack=lambda: acks.append(1)),
                         deadline=float("inf"))
    w._start(job)
    job.thread.join(10)
    w._handle_events()
    assert sent and sent[-1].type == "result" and sent[-1].exit_code == 1
    assert "embedded null byte" in sent[-1].stderr[0]
    assert acks == [1] and "web1" not in w.slots.running


def test_broker_url_is_shown_without_its_password():
    spec = transport.BrokerSpec("amqps://host1:s3cret@mq.example.org:5671/fleet")
    assert spec.shown == "amqps://host1:***@mq.example.org:5671/fleet"
    assert "s3cret" not in spec.shown


def test_tls_files_need_an_amqps_url():
    pytest.importorskip("kombu")
    with pytest.raises(UsageError) as exc:
        transport.connection(transport.BrokerSpec("amqp://mq//", ca="/etc/ca.pem"))
    assert "amqps://" in str(exc.value)


def test_job_ids_are_checked():
    assert protocol.valid_job_id(protocol.new_job_id())
    assert not protocol.valid_job_id("../../etc/passwd")
    assert not protocol.valid_job_id(None)


def test_journal_answers_done_jobs_and_lists_cut_short_ones(tmp_path):
    j = Journal(str(tmp_path))
    a, b = protocol.new_job_id(), protocol.new_job_id()
    j.begin(a, "web1", ["-b", "web1", "-u"])
    j.begin(b, "web2", ["-b", "web2", "-u"])
    j.finish(b, "web2", {"type": "result", "exit_code": 0})
    entries = j.entries()
    assert entries[a]["state"] == "running" and entries[a]["box"] == "web1"
    assert j.get(b)["reply"] == {"type": "result", "exit_code": 0}
    j.prune(now=entries[b]["finished"] + 8 * 24 * 3600)
    assert j.get(b) is None and j.get(a) is not None  # old answers go, cut-short ones stay
    j.forget(a)
    assert j.entries() == {}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_broker_is_exit_7(vmim, monkeypatch, tmp_path):
    pytest.importorskip("kombu")
    monkeypatch.setenv("VMIM_CFG", str(tmp_path / "none.cfg"))
    r = vmim("--broker", f"amqp://u:pw@127.0.0.1:{_closed_port()}//", "-b", "web1", "-u")
    assert r.code == 7, r
    assert "cannot reach the broker" in r.err and "u:***@" in r.err and "pw" not in r.err


def test_vmim_broker_sends_lists_to_the_fleet_and_local_keeps_them_here(vmim, monkeypatch,
                                                                         write_config):
    pytest.importorskip("kombu")
    cfg = write_config('[vmim.local]\nvmemulator = "test:///default"\n')
    monkeypatch.setenv("VMIM_BROKER", f"amqp://127.0.0.1:{_closed_port()}//")
    assert vmim("--config", cfg, "-L").code == 7
    r = vmim("--config", cfg, "-L", "--local")
    assert r.code == 0, r
    assert "NAME" in r.out


def test_broker_key_in_the_config_sends_to_the_fleet(vmim, monkeypatch, write_config):
    pytest.importorskip("kombu")
    monkeypatch.delenv("VMIM_BROKER", raising=False)
    cfg = write_config(f'[vmim.local]\nbroker = "amqp://127.0.0.1:{_closed_port()}//"\n')
    r = vmim("--config", cfg, "-L")
    assert r.code == 7, r
    assert "cannot reach the broker" in r.err


def test_worker_without_a_broker_is_a_usage_error(vmim, monkeypatch, write_config):
    monkeypatch.delenv("VMIM_BROKER", raising=False)
    cfg = write_config("[vmim.local]\n")
    r = vmim("worker", "--config", cfg)
    assert r.code == 2, r
    assert "no broker" in r.err


def test_a_fleet_dry_run_prints_the_plan_as_a_local_one():
    """The worker sends Plan.as_dict(); the client prints it with the same Plan.text()."""
    from vmim.plan import Plan, Step, Verdict, dry_run_summary

    plan = Plan("web1", (Step("down", "shut the domain down", True),
                         Step("restore", "restore golden")),
                Verdict(4, "image 'golden' is not in the store"))
    assert Plan.from_dict("web1", plan.as_dict()).text() == plan.text()
    assert Plan.from_dict("web2", Plan("web2", ()).as_dict()) == Plan("web2", ())
    assert dry_run_summary(0).endswith("unless something fails on the way)\n")


def test_the_journal_and_leases_live_in_verified_directories(tmp_path):
    """A state directory another user may write is refused (exit 7), and a symlink planted
    for a job's journal entry is replaced, never written through."""
    import os

    from vmim.fleet.children import Children
    from vmim.safedir import UnsafeDirectoryError

    open_state = tmp_path / "open"
    open_state.mkdir()
    os.chmod(open_state, 0o777)
    job = protocol.new_job_id()
    with pytest.raises(UnsafeDirectoryError):
        Journal(str(open_state)).begin(job, "web1", {})
    with pytest.raises(UnsafeDirectoryError):
        Children("/c", str(open_state), 20).renew_lease(job)
    state = tmp_path / "state"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    Journal(str(state)).begin(protocol.new_job_id(), "web1", {})  # makes fleet/jobs
    (state / "fleet" / "jobs" / f"{job}.json").symlink_to(victim)
    Journal(str(state)).begin(job, "web1", {})
    assert victim.read_text() == "precious\n"
    assert Journal(str(state)).get(job)["box"] == "web1"
    Children("/c", str(state), 20).renew_lease(job)
    assert os.path.isfile(state / "fleet" / "leases" / job)


@pytest.mark.parametrize("route,ok", [
    ({"exchange": "vmim.jobs.topic", "routing_key": "box.web1"}, True),
    ({"exchange": "", "routing_key": "vmim.host.h1.box.web1"}, False),  # amq.default
    ({"exchange": "vmim.jobs.topic", "routing_key": "any"}, False),
    ({"exchange": "vmim.jobs", "routing_key": "box.web1"}, False),  # of an earlier release
    ({"exchange": "vmim.host.h1.x", "routing_key": "box.web1"}, False),  # a host's own
    ({}, False),
])
def test_a_job_is_taken_only_from_the_jobs_exchange_with_its_queues_routing_key(route, ok):
    """Through the default exchange any broker user that may write on it (a host's user does,
    to answer clients) reaches any queue by name: a job must have come through the jobs
    exchange (vmim.jobs.topic; the direct vmim.jobs of earlier releases no more)."""
    body = protocol.Job(protocol.new_job_id(), "web1", time.time() + 30,
                        BoxRun(Request(actions=("mount",)))).encode()
    if ok:
        assert protocol.decode_job(body, "web1", route).box == "web1"
    else:
        with pytest.raises(ProtocolError, match=r"only from exchange vmim\.jobs\.topic "):
            protocol.decode_job(body, "web1", route)
    protocol.check_list_route({"exchange": "vmim.control", "routing_key": ""})
    with pytest.raises(ProtocolError, match="only from exchange vmim.control"):
        protocol.check_list_route({"exchange": "", "routing_key": "vmim.control.h1.abc"})


def test_a_slot_the_worker_does_not_serve_takes_no_any_free_job(tmp_path):
    """A slot named with a word '*' or '#' has no queue of its own (its key would route other
    boxes' jobs to it), so the client cannot believe an any-free result on it: the worker does
    not offer it for one either (attack G of 2026-12-07: it ran the job, the client refused the
    answer, exit 7)."""
    from types import SimpleNamespace

    from vmim.fleet import worker as worker_mod

    cfg = SimpleNamespace(statedir=str(tmp_path), slots=[], path="/c",
                          slot_names=["web1", "web.*", "db.#.x", "web2"])
    w = worker_mod.Worker(cfg, transport.BrokerSpec("amqp://x//"), "h1")
    assert w.slots.idle() == ["web1", "web2"]
