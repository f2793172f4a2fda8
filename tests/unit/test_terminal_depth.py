"""What reaches the admin's terminal is escaped at one depth, whatever code path wrote it: a
fleet worker (or anything that can publish to a client's reply queue) names hosts, plan steps,
expected errors, list cells and XML; a local user names the process that holds a slot's lock.
None of it puts a terminal control (ESC, BEL, CR, CSI 0x9b...) on stdout or stderr, and none of
it starts a line of its own; --json stays valid JSON and keeps the values as they are.

The fleet client runs here in-process, end to end from main() (argv, decoding, rendering),
with the broker connection replaced by a script of raw reply bodies (FakeClient)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest

from vmim.fleet import client, gather, protocol, topology

ESC = "\x1b]52;c;cm0gLXJmIC8K\x07\x1b[2J\r\x9b31m\x7f"
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
FORGED = "\nvmimagemanager: error: forged"


def clean(text: str) -> None:
    """No terminal control but newline and tab, and no line a value could have started."""
    assert not CONTROLS.search(text), repr(text)
    assert "\nvmimagemanager: error: forged" not in text, text
    assert "\\x1b]52" in text, text  # the value is shown, as text


class _Conn:
    def drain_events(self, timeout: float) -> None:
        import socket

        time.sleep(min(timeout, 0.01))
        raise socket.timeout()

    def heartbeat_check(self) -> None:
        pass


class _Message:
    def __init__(self, body: bytes, corr: str):
        self.body = body
        # from the client's own broker user, which a client believes (permissions.vouched)
        self.properties = {"correlation_id": corr, "user_id": "client"}


class FakeClient(client.Client):
    """A client whose broker answers each publish with the test's raw reply bodies."""

    script: Dict[str, List[Any]] = {}
    full_queue = False  # one worker's queue of list requests is full: the broker nacks

    def __init__(self, spec: Any):
        self.spec = spec
        self.inbox = []
        self.awaited = set()
        self.broadcast = set()
        self.conn = _Conn()
        self.user = "client"
        self.shared = topology.PRESENT  # the fleet's exchanges were there (workers served)
        self.nacked = set()  # list requests a full queue refused

    def publish(self, body: bytes, job_id: str, exchange: str, routing_key: str,
                expiration: Any = None, mandatory: bool = True) -> bool:
        self.awaited.add(job_id)
        if self.full_queue and exchange == protocol.CONTROL:
            self.nacked.add(job_id)
        for reply in self.script[exchange]:
            raw = reply if isinstance(reply, bytes) else json.dumps(
                dict({"v": protocol.VERSION}, **reply)).encode()
            self._on_reply(_Message(raw, job_id))
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def fleet_of(monkeypatch):
    """fleet_of(exchange, replies): the client's broker answers with these replies."""
    monkeypatch.setattr(client, "Client", FakeClient)
    monkeypatch.setattr(gather, "LIST_WINDOW", 0.05)

    def script(exchange: str, replies: List[Any]) -> None:
        monkeypatch.setattr(FakeClient, "script", {exchange: replies})

    return script


HOST = "hx"


def _lists_doc() -> Dict[str, Any]:
    locked = {"pid": 4, "command": "sleep " + ESC + FORGED}
    staged = {"image": "img" + ESC, "started": "2026", "finished": "2026" + ESC, "state": "ready",
              "skip": None}
    box = {"name": "web" + ESC + FORGED, "in_config": True, "section": "vmim.vm.web" + ESC,
           "domain": {"defined": True, "state": "running" + ESC, "persistent": True},
           "store_type": "rsync", "disk": "/d" + ESC, "disk_missing": False,
           "definition_drift": [], "mount": "/m" + ESC, "mounted": False, "locked": locked,
           "base": "b" + ESC, "incomplete": {"image": "i" + ESC}, "standby": None,
           "staged": staged}
    entry = {"name": "img" + ESC + FORGED, "directory": "/s" + ESC, "path": "/s/img",
             "format": "tgz" + ESC, "size": 10, "mtime": "2026-12-06T00:00:00" + ESC,
             "base_of": ["web" + ESC]}
    return {"version": "x", "exit_code": 0, "boxes": [box], "images": [entry],
            "inserts": [entry], "free": ["f" + ESC + FORGED],
            "locked": [{"name": "web" + ESC, **locked}]}


def test_fleet_lists_print_no_control_from_a_worker(vmim, fleet_of):
    fleet_of(protocol.CONTROL, [
        {"type": "here", "host": HOST},
        {"type": "lists", "host": HOST, "exit_code": 4, "doc": _lists_doc(),
         "stderr": ["vmimagemanager: warning: " + ESC + FORGED + "\n"]}])
    r = vmim("--broker", "amqp://nowhere", "-l", "-L", "--list-inserts", "-f", "-m")
    assert r.code == 4, r
    clean(r.out)
    clean(r.err)
    assert len([line for line in r.out.splitlines() if line.startswith("HOST")]) == 5, r.out
    assert r.err.count("\n") == 2, r.err  # the worker's lines, each under its host's name
    assert all(line.startswith("hx: ") for line in r.err.splitlines()), r.err


def test_a_host_name_with_controls_is_refused(vmim, fleet_of):
    """A host's name is printed as a column and a prefix of its lines: one that holds a
    control is a malformed reply (exit 7), not printed."""
    fleet_of(protocol.CONTROL, [{"type": "here", "host": "h" + ESC + FORGED}])
    r = vmim("--broker", "amqp://nowhere", "-l")
    assert r.code == 7, r
    assert "host holds a control character" in r.err, r.err
    assert not CONTROLS.search(r.err + r.out) and "forged" not in r.err + r.out, r


def test_a_hosts_malformed_lists_leave_the_other_hosts_lists_printed(vmim, fleet_of):
    fleet_of(protocol.CONTROL, [{"type": "here", "host": "hy"},
                                {"type": "lists", "host": "hy", "exit_code": 0,
                                 "doc": {"boxes": [1, "x"]}, "stderr": []},
                                {"type": "here", "host": HOST},
                                {"type": "lists", "host": HOST, "exit_code": 0,
                                 "doc": _lists_doc(), "stderr": []}])
    r = vmim("--broker", "amqp://nowhere", "-l", "-f")
    assert r.code == 7, r
    assert "no lists from hy: the lists from host hy" in r.err, r.err
    assert "hx" in r.out and "hy" not in r.out, r


def test_one_full_queue_of_list_requests_leaves_the_answers_printed(vmim, fleet_of,
                                                                      monkeypatch):
    """The broker refused the list request for one full queue (a nack), the other workers
    answered: their lists are printed, and the exit is 5 with why; nobody answered: exit 5,
    busy, not 7 ("no worker")."""
    monkeypatch.setattr(FakeClient, "full_queue", True)
    fleet_of(protocol.CONTROL, [{"type": "here", "host": HOST},
                                {"type": "lists", "host": HOST, "exit_code": 0,
                                 "doc": _lists_doc(), "stderr": []}])
    r = vmim("--broker", "amqp://nowhere", "-l", "-f")
    assert r.code == 5, r
    assert "queue of list requests is full" in r.err and "hx" in r.out, r
    fleet_of(protocol.CONTROL, [])
    r = vmim("--broker", "amqp://nowhere", "-l")
    assert r.code == 5 and "busy or stalled" in r.err, r


def test_fleet_lists_as_json_keep_the_values(vmim, fleet_of):
    fleet_of(protocol.CONTROL, [{"type": "here", "host": HOST},
                                {"type": "lists", "host": HOST, "exit_code": 0,
                                 "doc": _lists_doc(), "stderr": []}])
    r = vmim("--broker", "amqp://nowhere", "-l", "-f", "--json")
    assert r.code == 0, r
    assert not CONTROLS.search(r.out)
    doc = json.loads(r.out)
    assert doc["hosts"] == [HOST] and doc["boxes"][0]["name"] == "web" + ESC + FORGED


def test_a_fleet_plan_prints_no_control_from_a_worker(vmim, fleet_of):
    plan = {"steps": [{"step": "mount" + ESC, "description": "mount it" + ESC + FORGED,
                       "implicit": False}],
            "expected_exit_code": 4, "expected_error": "no" + ESC + FORGED}
    fleet_of(protocol.JOBS, [
        {"type": "result", "host": HOST, "box": "hx1", "exit_code": 4,
         "doc": {"plan": {"hx1" + ESC: plan}, "expected_exit_code": 4,
                 "xml": {"hx1": "<domain>" + ESC + "</domain>\n"}},
         "stderr": ["vmimagemanager: error: " + ESC + "\n"]}])
    r = vmim("--broker", "amqp://nowhere", "-b", "hx1", "--mount", "--dry-run")
    assert r.code == 4, r
    clean(r.out)
    clean(r.err)
    assert "the run would fail (exit 4): no\\x1b]52" in r.out, r.out


def test_a_workers_stderr_line_is_one_line_on_the_client(vmim, fleet_of):
    """A line of the worker's run with a newline inside would print a line of the worker's
    making, as if of this client; so would a result's stderr line (answered from a journal)."""
    fleet_of(protocol.JOBS, [
        {"type": "accepted", "host": HOST, "box": "hx1"},
        {"type": "log", "host": HOST, "box": "hx1", "line": "vmimagemanager: info: a" + FORGED},
        {"type": "result", "host": HOST, "box": "hx1", "exit_code": 0, "doc": {},
         "stderr": []}])
    r = vmim("--broker", "amqp://nowhere", "-b", "hx1", "--release")
    assert r.code == 0, r
    assert "vmimagemanager: info: a\\nvmimagemanager: error: forged" in r.err, r.err
    assert not any(line.startswith("vmimagemanager: error") for line in r.err.splitlines()), r
    fleet_of(protocol.JOBS, [
        {"type": "result", "host": HOST, "box": "hx1", "exit_code": 0, "doc": {},
         "stderr": ["vmimagemanager: info: b" + FORGED + "\n"]}])
    r = vmim("--broker", "amqp://nowhere", "-b", "hx1", "--release")
    assert r.code == 0, r
    assert "vmimagemanager: info: b\\nvmimagemanager: error: forged\n" in r.err, r.err


def test_a_local_plan_names_a_lock_holder_with_controls_escaped(vmim, tmp_path, write_config):
    """Any local user who can read a slot's lock file can flock it, from a process whose
    command line holds controls: the plan names that process."""
    (tmp_path / "locks").mkdir(mode=0o755)
    disk = tmp_path / "web1.img"
    disk.write_bytes(b"\0" * 4096)
    cfg = write_config(f"""\
        [vmim.local]
        vmemulator = "test:///default"
        lockdir = {tmp_path}/locks
        statedir = {tmp_path}/state

        [vmim.vm.web1]
        HostName = web1
        HostDisk = {disk}
        """)
    lockfile = tmp_path / "locks" / "web1.lock"
    lockfile.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
         "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
         str(lockfile), ESC + FORGED], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        r = vmim("--config", cfg, "-b", "web1", "--dry-run", "-u")
        m = vmim("--config", cfg, "-m")
    finally:
        holder.kill()
        holder.wait()
    assert r.code == 5, r
    clean(r.out)
    clean(m.out)
    assert f"pid {holder.pid}" in r.out, r


def test_the_worker_log_cannot_be_forged_by_a_routing_key(capsys):
    """A refused job is logged with the routing key it came with: a key holding a newline
    does not start a log line of its own; a traceback's lines are indented under their
    record."""
    import logging
    from types import SimpleNamespace

    from vmim.errors import ProtocolError
    from vmim.fleet.worker import Worker
    from vmim.frontend import setup_logging

    setup_logging(0, 0, None)
    key = "box.web1\n2026-12-06 12:00:00 vmimagemanager: info: forged"
    with pytest.raises(ProtocolError) as info:
        protocol.check_route({"exchange": "vmim.jobs", "routing_key": key}, "web1")
    message = SimpleNamespace(properties={}, acknowledged=False, ack=lambda: None)
    Worker._refuse(SimpleNamespace(host="h1"), message, str(info.value))
    log = logging.getLogger("vmim.fleet.worker")
    log.error("refusing a job: %s", key)  # whatever a message quotes
    try:
        raise ProtocolError(key)
    except ProtocolError:
        log.exception("refusing a job")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len([line for line in lines if not line.startswith(" ")]) == 3, err
    assert all(line.startswith(("vmimagemanager: ", " ")) for line in lines), err
    assert all("\\n2026-12-06" in line for line in lines[:2]), err


def test_a_log_format_of_the_admins_cannot_be_forged_either(tmp_path, capsys):
    """$VMIM_LOG_CONF gives the worker a formatter of the admin's (timestamps first): a
    record is still one line, its traceback indented under it."""
    import logging

    from vmim.frontend import setup_logging

    conf = tmp_path / "log.conf"
    conf.write_text("[loggers]\nkeys=root\n[handlers]\nkeys=err\n[formatters]\nkeys=f\n"
                    "[logger_root]\nlevel=INFO\nhandlers=err\n"
                    "[handler_err]\nclass=StreamHandler\nformatter=f\nargs=(sys.stderr,)\n"
                    "[formatter_f]\nformat=%(asctime)s %(levelname)s %(message)s\n")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(0, 0, str(conf))
        forged = "\n2026-12-06 12:00:00,000 INFO forged\x1b[2J"
        log = logging.getLogger("vmim.fleet.worker")
        log.error("refusing a job: %s", forged)
        try:
            raise ValueError(forged)
        except ValueError:
            log.exception("internal error%s", forged)
        err = capsys.readouterr().err
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert "\x1b" not in err, err
    assert not any(line.startswith("2026-12-06 12:00:00,000 INFO forged")
                   for line in err.splitlines()), err
    assert len([line for line in err.splitlines() if not line.startswith(" ")]) == 2, err
