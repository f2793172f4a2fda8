"""`vmimagemanager worker`: serve this host's slots to the fleet.

One queue per slot (`vmim.host.<host>.box.<box>`, bound to `box.<box>` on `vmim.jobs`),
consumed with prefetch 1, so a slot runs one job at a time and the host's slots run at once;
`vmim.any` is consumed only while a slot is free (prefetch: the number of slots). Each job
runs as the local command would, in a child process (vmim.fleet.child) under the same
per-slot lock; the reply (the command's JSON document, its stderr lines, its exit code) is
published before the job is acknowledged, and kept in the journal so that a redelivered job
that had finished is answered, not re-run.

All AMQP traffic happens in the main thread; job threads hand their events over a queue.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from vmim import lease
from vmim.errors import (
    EXIT_ENVIRONMENT,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_STATE,
    EXIT_USAGE,
    VmimError,
)
from vmim.fleet import protocol
from vmim.fleet.journal import Journal

log = logging.getLogger("vmim.fleet.worker")

POLL = 0.05
REDELIVER = 120.0  # seconds a result is offered to a client that is reconnecting
RETRY_ANY = 1.0  # after giving back an any-free job (no slot really free): pause that long


@dataclass
class Job:
    job_id: str
    box: str
    argv: List[str]
    reply_to: str
    message: Any
    deadline: float
    any_free: bool = False
    proc: Optional[subprocess.Popen] = None
    thread: Optional[threading.Thread] = None
    aborted: bool = False


def build_parser() -> argparse.ArgumentParser:
    from vmim.cli import _Parser
    from vmim.output import PROG

    p = _Parser(prog=f"{PROG} worker",
                description="Serve this host's slots to the fleet: run the box actions and "
                "lists that clients send through RabbitMQ (docs/fleet.md). Runs in the "
                "foreground; SIGTERM stops taking jobs, lets the running ones finish, exits 0.")
    p.add_argument("-c", "--config", metavar="PATH",
                   help="config file (else $VMIM_CFG, else /etc/vmimagemanager/vmimagemanager.cfg)")
    p.add_argument("--broker", metavar="URL",
                   help="broker URL (else $VMIM_BROKER, else broker in the config)")
    p.add_argument("--host-name", metavar="NAME",
                   help="this host's name in the fleet (default: the machine's host name)")
    p.add_argument("--heartbeat", type=int, default=protocol.HEARTBEAT, metavar="S",
                   help=f"AMQP heartbeat in seconds (default {protocol.HEARTBEAT}): a worker silent for "
                   "about twice this loses its jobs to other workers, and aborts them itself")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    p.add_argument("--syslog", nargs="?", const="/dev/log", metavar="SOCKET",
                   help="also log to syslog (default socket /dev/log)")
    return p


def main(argv: List[str]) -> int:
    from vmim import config as config_mod
    from vmim.cli import setup_logging
    from vmim.output import PROG

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    except VmimError as exc:
        import sys

        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    try:
        setup_logging(args.verbose, args.quiet, None, args.syslog)
        cfg = config_mod.load(args.config)
        url = args.broker or os.environ.get(protocol.ENV_BROKER) or cfg.broker
        if not url:
            raise VmimError("no broker: give --broker URL, set $VMIM_BROKER, or broker in "
                            f"[vmim.local] of {cfg.path}")
        spec = protocol.BrokerSpec(url, cfg.broker_ca, cfg.broker_cert, cfg.broker_key)
        worker = Worker(cfg, spec, args.host_name or socket.gethostname(), args.heartbeat)
        return worker.run()
    except VmimError as exc:
        import sys

        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code if exc.exit_code != 1 else EXIT_USAGE


class Worker:
    def __init__(self, cfg: Any, spec: protocol.BrokerSpec, host: str,
                 heartbeat: int = protocol.HEARTBEAT):
        self.cfg = cfg
        self.heartbeat = heartbeat
        self.spec = spec
        self.host = host
        self.journal = Journal(cfg.statedir)
        self.events: queue.Queue[tuple] = queue.Queue()
        self.jobs: Dict[str, Job] = {}  # box → the fleet job on it (running, or reserved)
        self.waiting: Dict[str, Job] = {}  # box → a box-routed job waiting for the box
        self.stopping = False
        self.conn: Any = None
        self.producer: Any = None
        self.box_consumers: List[Any] = []
        self.any_consumer: Any = None
        self.any_on = False
        self.any_paused_until = 0.0
        self.returned: List[Any] = []
        self.undelivered: List[tuple] = []  # (until, reply_to, job_id, reply)
        self.next_retry = 0.0

    # ------------------------------------------------------------------ life cycle

    def _on_term(self, signum: int, _frame: Any) -> None:
        if self.stopping:  # a second SIGTERM: abort the running jobs (they clean up)
            log.warning("second %s: aborting the running jobs", signal.Signals(signum).name)
            for job in list(self.jobs.values()):
                self._terminate(job)
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_term)
        self.recover()
        self.journal.prune()
        slots = ", ".join(self.cfg.slot_names) or "(none)"
        log.info("worker %s: slots %s; broker %s", self.host, slots, self.spec.shown)
        delay = 1.0
        while True:
            try:
                self._connect()
                log.info("worker %s: ready", self.host)
                delay = 1.0
                self._serve()
                break
            except Exception as exc:  # noqa: BLE001 - whatever it was, start over
                if isinstance(exc, protocol.refusals()):
                    log.error("the broker at %s refused: %s (see the permissions in "
                              "docs/fleet.md)", self.spec.shown, exc)
                elif isinstance(exc, protocol.connection_errors()):
                    log.warning("lost the broker at %s (%s)", self.spec.shown, exc)
                else:  # a bug: say so, with the traceback
                    log.exception("worker %s: internal error; reconnecting", self.host)
                self._drop_connection()
                if self.stopping:
                    break
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        self._close()
        log.info("worker %s stopped", self.host)
        return EXIT_OK

    def recover(self) -> None:
        """Release what a killed predecessor left: every slot whose job was still running."""
        for job_id, e in self.journal.entries().items():
            if e.get("state") != "running":
                continue
            box = str(e.get("box"))
            if self.cfg.slot(box) is None:
                self.journal.forget(job_id)
                continue
            log.warning("job %s on box %s was cut short by a killed worker: releasing box %s",
                        job_id, box, box)
            res = subprocess.run(protocol.child_command(["-b", box, "--release"],
                                                        self.cfg.path, 0),
                                 capture_output=True, text=True, env=protocol.child_env())
            for line in res.stderr.splitlines():
                log.info("release %s: %s", box, line)
            if res.returncode != 0:
                log.error("box %s: release after a killed worker failed (exit %d)", box,
                          res.returncode)
            self.journal.forget(job_id)  # a redelivery runs the job again, from the start

    def _connect(self) -> None:
        import kombu

        self.conn = protocol.connection(self.spec, self.heartbeat)
        protocol.connect(self.conn)
        channel = self.conn.channel()
        self.producer = kombu.Producer(channel, on_return=self._on_return)
        jobs = kombu.Exchange(protocol.JOBS, type="direct", durable=True)
        control = kombu.Exchange(protocol.CONTROL, type="fanout", durable=True)
        self.box_consumers = []
        for slot in self.cfg.slots:
            q = kombu.Queue(protocol.box_queue(self.host, slot.name), jobs,
                            routing_key=protocol.box_key(slot.name), durable=True)
            c = kombu.Consumer(channel, queues=[q], callbacks=[self._on_box_job],
                               prefetch_count=1, accept=["json"], no_ack=False)
            c.qos(prefetch_count=1)  # per consumer (RabbitMQ): one job per slot at a time
            c.consume()
            self.box_consumers.append(c)
        anyq = kombu.Queue(protocol.ANY_QUEUE, jobs, routing_key=protocol.ANY_KEY, durable=True)
        self.any_consumer = kombu.Consumer(channel, queues=[anyq], callbacks=[self._on_any_job],
                                           prefetch_count=1, accept=["json"], no_ack=False,
                                           auto_declare=True)
        self.any_on = False
        ctlq = kombu.Queue(f"vmim.control.{self.host}.{protocol.new_job_id()[:8]}", control,
                           exclusive=True, auto_delete=True, durable=False)
        self.ctl_consumer = kombu.Consumer(channel, queues=[ctlq], callbacks=[self._on_control],
                                           accept=["json"], no_ack=True)
        self.ctl_consumer.consume()
        self._update_any()

    def _drop_connection(self) -> None:
        """The broker is gone: every unacknowledged job may go to another worker now, so the
        running ones are aborted (their command cleans up as after SIGTERM) and forgotten."""
        for job in list(self.jobs.values()):
            if job.proc is not None:
                self._terminate(job)
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join()
        for job in list(self.jobs.values()):
            self.journal.forget(job.job_id)
        self.jobs.clear()
        self.waiting.clear()
        while not self.events.empty():
            self.events.get_nowait()
        try:
            if self.conn is not None:
                self.conn.release()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass
        self.conn = None

    def _close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.release()
            except Exception:  # noqa: BLE001
                pass
            self.conn = None

    def _serve(self) -> None:
        cancelled = False
        last_beat = 0.0
        while True:
            if self.stopping and not cancelled:
                log.info("stopping: no new jobs; %d running", len(self.jobs))
                for c in self.box_consumers:
                    c.cancel()
                self._any(False)
                cancelled = True
            if self.stopping and not self.jobs and not self.waiting:
                return
            try:
                self.conn.drain_events(timeout=POLL)
            except socket.timeout:
                pass
            now = time.monotonic()
            if now - last_beat > min(1.0, self.heartbeat / 4):
                away = now - last_beat if last_beat else 0.0
                self.conn.heartbeat_check()
                last_beat = now
                if away < self.heartbeat:  # not frozen past a heartbeat: the jobs are still ours
                    self._renew_leases()
            self._handle_events()
            self._expire_waiting()
            self._retry_replies()
            if not self.stopping:
                self._update_any()

    # ------------------------------------------------------------------ publishing

    def _on_return(self, exc: Any, exchange: Any, routing_key: Any, message: Any) -> None:
        self.returned.append(routing_key)

    def _send(self, reply_to: str, job_id: str, body: Dict[str, Any],
              mandatory: bool = False) -> bool:
        """Publish to a client's reply queue; False when the client is gone (mandatory)."""
        self.returned = []
        self.producer.publish(protocol.encode(body), exchange="", routing_key=reply_to,
                              correlation_id=job_id, content_type="application/json",
                              content_encoding="utf-8", mandatory=mandatory, serializer=None)
        return not self.returned

    # ------------------------------------------------------------------ jobs

    def _decode(self, body: Any, message: Any, any_free: bool) -> Optional[Job]:
        try:
            data = body if isinstance(body, dict) else json.loads(body)
            if data.get("v") != protocol.VERSION or not protocol.valid_job_id(data.get("job_id")):
                raise ValueError("not a version-1 job")
            argv = protocol.checked_argv(data.get("argv"))
            reply_to = message.properties.get("reply_to")
            if not reply_to:
                raise ValueError("no reply_to")
        except (ValueError, TypeError, VmimError, AttributeError) as exc:
            log.error("dropping a malformed job: %s", exc)
            message.reject(requeue=False)
            return None
        deadline = float(data.get("deadline") or time.time())
        return Job(job_id=data["job_id"], box="", argv=argv, reply_to=reply_to,
                   message=message, deadline=deadline, any_free=any_free)

    def _answered_from_journal(self, job: Job) -> bool:
        entry = self.journal.get(job.job_id)
        if entry is None or entry.get("state") != "done":
            return False
        log.info("job %s was done already (box %s): answering from the journal",
                 job.job_id, entry.get("box"))
        self._send(job.reply_to, job.job_id, entry["reply"])
        job.message.ack()
        return True

    def _accept(self, job: Job) -> bool:
        """Tell the client who took the job; a client that gave up has no queue any more: the
        job is then dropped (acknowledged, not run)."""
        body: Dict[str, Any] = {"type": "accepted", "host": self.host, "box": job.box}
        if self._send(job.reply_to, job.job_id, body, mandatory=True):
            return True
        log.warning("job %s for box %s: its client is gone; not running it", job.job_id, job.box)
        job.message.ack()
        return False

    def _on_box_job(self, body: Any, message: Any) -> None:
        job = self._decode(body, message, any_free=False)
        if job is None or self._answered_from_journal(job):
            return
        boxes = _boxes_of(job.argv)
        if len(boxes) != 1 or self.cfg.slot(boxes[0]) is None:
            self._reply_now(job, protocol_error(
                f"box {', '.join(boxes)} is not served by {self.host}: one box per job, "
                "one of its own", EXIT_STATE))
            return
        job.box = boxes[0]
        # Reserve the slot before publishing anything: while a publish waits for its confirm,
        # kombu runs the callbacks of new deliveries, and an any-free job must not pick it.
        busy = job.box in self.jobs  # an any-free job of the fleet runs there: wait for it
        (self.waiting if busy else self.jobs)[job.box] = job
        if not self._accept(job):
            (self.waiting if busy else self.jobs).pop(job.box, None)
            return
        if not busy:
            self._start(job)

    def _on_any_job(self, body: Any, message: Any) -> None:
        job = self._decode(body, message, any_free=True)
        if job is None or self._answered_from_journal(job):
            return
        box = self._free_slot() if time.monotonic() >= self.any_paused_until else None
        if box is None:  # nothing really free: give it back for another worker
            message.requeue()
            self.any_paused_until = time.monotonic() + RETRY_ANY  # the main loop cancels
            return
        job.box = box
        job.argv = _with_box(job.argv, box)
        self.jobs[box] = job  # reserved before any publish (see _on_box_job)
        if not self._accept(job):
            self.jobs.pop(box, None)
            return
        self._send(job.reply_to, job.job_id, {"type": "claimed", "box": box, "host": self.host})
        self._start(job)

    def _free_slot(self) -> Optional[str]:
        from vmim import domain, listing

        try:
            hv = domain.connect(self.cfg.uri)
        except VmimError as exc:
            log.error("cannot judge free slots: %s", exc)
            return None
        try:
            rows = listing.boxes(self.cfg, hv.domains())
        finally:
            hv.close()
        for r in rows:
            if r.is_free and r.name not in self.jobs and r.name not in self.waiting:
                return r.name
        return None

    def _start(self, job: Job) -> None:
        self.jobs[job.box] = job
        self.journal.begin(job.job_id, job.box, job.argv)
        job.thread = threading.Thread(target=self._run_job, args=(job,), daemon=True,
                                      name=f"job-{job.box}")
        job.thread.start()  # the main loop stops consuming vmim.any when no slot is left

    def _lease_path(self, job: Job) -> str:
        directory = os.path.join(self.cfg.statedir, "fleet", "leases")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.path.join(directory, job.job_id)

    def _renew_leases(self) -> None:
        for job in list(self.jobs.values()):
            if job.proc is not None and job.proc.poll() is None:
                try:
                    lease.renew(self._lease_path(job))
                except OSError as exc:
                    log.warning("cannot renew the lease of job %s: %s", job.job_id, exc)

    def _run_job(self, job: Job) -> None:
        """In a job thread: run the command, stream its stderr, hand over the reply."""
        argv = protocol.child_command(job.argv, self.cfg.path, job.deadline - time.time())
        log.info("job %s: box %s: %s", job.job_id, job.box, " ".join(job.argv))
        try:
            env = protocol.child_env()
            env[lease.ENV_LEASE] = self._lease_path(job)  # stale: the job stops before a step
            env[lease.ENV_TTL] = str(2 * self.heartbeat)  # when the broker hands it on
            lease.renew(env[lease.ENV_LEASE])
            job.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            self.events.put(("reply", job, protocol_error(f"cannot start the job: {exc}",
                                                          EXIT_ENVIRONMENT)))
            return
        assert job.proc.stdout is not None and job.proc.stderr is not None
        out: List[bytes] = []
        reader = threading.Thread(target=lambda: out.append(job.proc.stdout.read()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        lines: List[str] = []
        for raw in job.proc.stderr:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            self.events.put(("log", job, line))
        reader.join()
        code = job.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self._lease_path(job))
        try:
            doc = json.loads(b"".join(out) or b"{}")
        except ValueError:
            doc = {}
        if code < 0:  # killed by a signal: as the shell reports it
            code = 128 - code
        doc["host"] = self.host
        if job.any_free:  # the child was given the claimed slot by name
            doc["claimed"] = job.box
        self.events.put(("reply", job, {"type": "result", "host": self.host, "box": job.box,
                                        "exit_code": code, "doc": doc, "stderr": lines}))

    def _reply_now(self, job: Job, reply: Dict[str, Any]) -> None:
        reply["host"] = self.host
        self._send(job.reply_to, job.job_id, reply)
        job.message.ack()

    def _handle_events(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            kind = event[0]
            if kind == "log":
                _, job, line = event
                self._send(job.reply_to, job.job_id, {"type": "log", "line": line})
            elif kind == "reply":
                _, job, reply = event
                self._finish(job, reply)
            elif kind == "list":
                _, reply_to, corr, reply = event
                self._send(reply_to, corr, reply)

    def _finish(self, job: Job, reply: Dict[str, Any]) -> None:
        if job.aborted:  # the broker was lost: the job may run elsewhere; say nothing
            self.journal.forget(job.job_id)
        else:
            self.journal.finish(job.job_id, job.box, reply)
            if not self._send(job.reply_to, job.job_id, reply, mandatory=True):
                # the client is reconnecting (a broker restart): try again for a while
                self.undelivered.append((time.monotonic() + REDELIVER, job.reply_to,
                                         job.job_id, reply))
            job.message.ack()
            log.info("job %s: box %s: exit %s", job.job_id, job.box, reply.get("exit_code"))
        self.jobs.pop(job.box, None)
        waiting = self.waiting.pop(job.box, None)
        if waiting is not None:
            if time.time() > waiting.deadline:
                self._expired(waiting)
            else:
                self._start(waiting)

    def _retry_replies(self) -> None:
        now = time.monotonic()
        if now < self.next_retry or not self.undelivered:
            return
        self.next_retry = now + 1.0
        keep = []
        for until, reply_to, job_id, reply in self.undelivered:
            if self._send(reply_to, job_id, reply, mandatory=True):
                continue
            if now < until:
                keep.append((until, reply_to, job_id, reply))
            else:
                log.warning("job %s: its client did not come back; the result stays in the "
                            "journal", job_id)
        self.undelivered = keep

    def _expire_waiting(self) -> None:
        for box, job in list(self.waiting.items()):
            if time.time() > job.deadline:
                del self.waiting[box]
                self._expired(job)

    def _expired(self, job: Job) -> None:
        self._reply_now(job, protocol_error(
            f"box '{job.box}' is busy with another job of the fleet; try again later or wait "
            "with --lock-wait S", EXIT_LOCKED))

    def _terminate(self, job: Job) -> None:
        job.aborted = True
        if job.proc is not None and job.proc.poll() is None:
            job.proc.terminate()

    # ------------------------------------------------------------------ any-free

    def _update_any(self) -> None:
        free = [s for s in self.cfg.slot_names if s not in self.jobs and s not in self.waiting]
        self._any(bool(free) and time.monotonic() >= self.any_paused_until)

    def _any(self, on: bool) -> None:
        if on == self.any_on or self.any_consumer is None:
            return
        if on:
            # up to one any-free job per slot; one that finds no slot really free goes back
            self.any_consumer.qos(prefetch_count=max(1, len(self.cfg.slots)))
            self.any_consumer.consume()
        else:
            self.any_consumer.cancel()
        self.any_on = on

    # ------------------------------------------------------------------ fleet lists

    def _on_control(self, body: Any, message: Any) -> None:
        try:
            data = body if isinstance(body, dict) else json.loads(body)
            lists = [w for w in data.get("lists", []) if w in
                     ("boxes", "images", "inserts", "free", "locked")]
            reply_to = message.properties.get("reply_to")
            corr = message.properties.get("correlation_id")
        except (ValueError, TypeError, AttributeError):
            return
        if not reply_to or not lists:
            return
        self._send(reply_to, corr, {"type": "here", "host": self.host})
        threading.Thread(target=self._run_list, args=(lists, reply_to, corr), daemon=True).start()

    def _run_list(self, lists: List[str], reply_to: str, corr: str) -> None:
        argv = protocol.child_command(protocol.list_argv(lists), self.cfg.path, 0)
        res = subprocess.run(argv, capture_output=True, env=protocol.child_env())
        try:
            doc = json.loads(res.stdout or b"{}")
        except ValueError:
            doc = {}
        self.events.put(("list", reply_to, corr, {
            "type": "lists", "host": self.host, "exit_code": res.returncode, "doc": doc,
            "stderr": res.stderr.decode("utf-8", "replace").splitlines(True)}))


def protocol_error(message: str, code: int = EXIT_USAGE) -> Dict[str, Any]:
    from vmim.output import PROG

    return {"type": "result", "exit_code": code, "stderr": [f"{PROG}: error: {message}\n"],
            "doc": {"error": {"message": message, "exit_code": code}}}


def _boxes_of(argv: List[str]) -> List[str]:
    from vmim.cli import build_parser

    return list(build_parser().parse_args(argv).box)


def _with_box(argv: List[str], box: str) -> List[str]:
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] in ("-b", "--box") and out[i + 1] == "any-free":
            out[i + 1] = box
    return out
