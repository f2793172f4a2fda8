"""`vmimagemanager worker`: serve this host's slots to the fleet.

One queue per slot (`vmim.host.<host>.box.<box>`, bound to `box.<box>` on `vmim.jobs`),
consumed with prefetch 1, so a slot runs one job at a time and the host's slots run at once;
`vmim.any` is consumed only while a slot is free (prefetch: the number of slots). Each job
runs as the local command would, in a child process (vmim.fleet.child, which gets the typed
run on stdin) under the same per-slot lock; the reply (the command's JSON document, its
stderr lines, its exit code) is published before the job is acknowledged, and kept in the
journal so that a redelivered job that had finished is answered, not re-run.

A message is read only through vmim.fleet.protocol (typed, allow-listed, bounded): whatever
does not decode is refused — answered with an error when it names a client's reply queue —
and acknowledged, so that it never comes back, never stops the worker and never touches the
jobs it runs. A job on the shared any-free queue is an any-free job; a job on a slot's queue
is a job for that slot; the worker acts on its own slots only.

All AMQP traffic happens in the main thread; job threads hand their events over a queue.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from vmim import lease
from vmim.errors import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    ProtocolError,
    VmimError,
)
from vmim.fleet import protocol
from vmim.fleet.journal import Journal
from vmim.invocation import BoxRun, RunOptions
from vmim.plan import ANY_FREE, Request

log = logging.getLogger("vmim.fleet.worker")

POLL = 0.05
REDELIVER = 120.0  # seconds a result is offered to a client that is reconnecting
RETRY_ANY = 1.0  # after giving back an any-free job (no slot really free): pause that long
ACCEPT_GRACE = 5.0  # a client waits that long past its deadline for its job to be taken
RECOVER_WAIT = 60  # seconds a recovering release waits for the slot's lock (a dying child)


@dataclass
class Job:
    job_id: str
    box: str  # the slot it runs on (an any-free job: once claimed)
    run: BoxRun  # as the client sent it: no boxes
    reply_to: str
    message: Any
    deadline: float
    any_free: bool = False
    proc: Optional[subprocess.Popen] = None
    thread: Optional[threading.Thread] = None
    aborted: bool = False


def build_parser() -> argparse.ArgumentParser:
    from vmim.frontend import ArgParser
    from vmim.output import PROG

    p = ArgParser(prog=f"{PROG} worker",
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
    from vmim.frontend import setup_logging
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
        self.ping = max(1.0, min(5.0, heartbeat / 2))  # "running" to the clients, this often
        self.silence = 3.0 * heartbeat + 5  # a client gives a job up after that long unheard
        self.next_ping = 0.0

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
        """Before serving: release what a killed predecessor left — every slot whose job was
        still running — the same release a local `-b BOX --release` does. It waits a while
        for the slot's lock: the killed job's own command may still be cleaning up."""
        for job_id, e in self.journal.entries().items():
            if e.get("state") != "running":
                continue
            box = str(e.get("box"))
            if self.cfg.slot(box) is None:
                self.journal.forget(job_id)
                continue
            log.warning("job %s on box %s was cut short by a killed worker: releasing box %s",
                        job_id, box, box)
            run = BoxRun(Request(boxes=(box,), actions=("release",)),
                         RunOptions(json=True, lock_wait=RECOVER_WAIT))
            res = self._run_child(run, capture=True)
            for line in res.stderr.decode("utf-8", "replace").splitlines():
                log.info("release %s: %s", box, line)
            if res.returncode != 0:
                log.error("box %s: release after a killed worker failed (exit %d); the worker "
                          "serves the box anyway: its next job's command releases it first "
                          "or fails clearly", box, res.returncode)
            self.journal.forget(job_id)  # a redelivery runs the job again, from the start

    def _run_child(self, run: BoxRun, capture: bool = False,
                   env: Optional[Dict[str, str]] = None) -> Any:
        """The child for one run (vmim.fleet.child): the typed run on its stdin, as JSON.
        capture: run it to its end (CompletedProcess); else the started Popen."""
        data = json.dumps(run.to_dict()).encode()
        argv = protocol.child_command(self.cfg.path)
        env = env or protocol.child_env()
        if capture:
            return subprocess.run(argv, input=data, capture_output=True, env=env)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE, env=env)
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except OSError:  # the child died at once: its exit code and stderr say why
            pass
        return proc

    def _connect(self) -> None:
        import kombu

        self.conn = protocol.connection(self.spec, self.heartbeat)
        protocol.connect(self.conn)
        channel = self.conn.channel()
        self.producer = kombu.Producer(channel, on_return=self._on_return)
        jobs = kombu.Exchange(protocol.JOBS, type="direct", durable=True)
        control = kombu.Exchange(protocol.CONTROL, type="fanout", durable=True)
        self.box_consumers = []
        for slot in self.cfg.slots:  # raw messages (on_message): protocol.decode_* reads them
            q = kombu.Queue(protocol.box_queue(self.host, slot.name), jobs,
                            routing_key=protocol.box_key(slot.name), durable=True)
            c = kombu.Consumer(channel, queues=[q],
                               on_message=functools.partial(self._on_message, slot.name),
                               prefetch_count=1, no_ack=False)
            c.qos(prefetch_count=1)  # per consumer (RabbitMQ): one job per slot at a time
            c.consume()
            self.box_consumers.append(c)
        anyq = kombu.Queue(protocol.ANY_QUEUE, jobs, routing_key=protocol.ANY_KEY, durable=True)
        self.any_consumer = kombu.Consumer(channel, queues=[anyq],
                                           on_message=functools.partial(self._on_message, None),
                                           prefetch_count=1, no_ack=False, auto_declare=True)
        self.any_on = False
        ctlq = kombu.Queue(f"vmim.control.{self.host}.{protocol.new_job_id()[:8]}", control,
                           exclusive=True, auto_delete=True, durable=False)
        self.ctl_consumer = kombu.Consumer(channel, queues=[ctlq], on_message=self._on_control,
                                           no_ack=True)
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
            if now >= self.next_ping:
                self.next_ping = now + self.ping
                self._ping()
            self._handle_events()
            self._expire_waiting()
            self._retry_replies()
            if not self.stopping:
                self._update_any()

    # ------------------------------------------------------------------ publishing

    def _on_return(self, exc: Any, exchange: Any, routing_key: Any, message: Any) -> None:
        self.returned.append(routing_key)

    def _send(self, reply_to: str, corr: Optional[str], reply: protocol.Reply,
              mandatory: bool = False) -> bool:
        """Publish to a client's reply queue; False when the client is gone (mandatory)."""
        self.returned = []
        self.producer.publish(reply.encode(), exchange="", routing_key=reply_to,
                              correlation_id=corr, content_type="application/json",
                              content_encoding="utf-8", mandatory=mandatory, serializer=None)
        return not self.returned

    def _ping(self) -> None:
        """Word to the clients of the jobs this worker holds (running or waiting for their
        slot), so that a client can tell a long job from a worker that died."""
        for job in [*self.jobs.values(), *self.waiting.values()]:
            if not job.aborted:
                self._send(job.reply_to, job.job_id,
                           protocol.Reply("running", self.host, box=job.box))

    # ------------------------------------------------------------------ jobs

    def _on_message(self, queue_box: Optional[str], message: Any) -> None:
        """A delivery on a slot's queue (queue_box) or on the any-free queue (None). Whatever
        it holds, it ends acknowledged, requeued for another worker or taken as a job; a
        bug here refuses the one message, it does not stop the worker or its jobs."""
        try:
            self._take(queue_box, message)
        except protocol.connection_errors():
            raise  # the broker is gone: the main loop reconnects
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the worker
            log.exception("worker %s: internal error on a message; refusing it", self.host)
            if not message.acknowledged:
                self._refuse(message, f"internal error in the worker: {exc!r}", EXIT_FAILED)

    def _refuse(self, message: Any, why: str, code: int = EXIT_USAGE) -> None:
        """Answer (when the message names a client's reply queue) and acknowledge."""
        props = getattr(message, "properties", None) or {}
        reply_to = protocol.usable_reply_to(props.get("reply_to"))
        corr = props.get("correlation_id")
        corr = corr if protocol.valid_job_id(corr) else None
        log.error("refusing a job%s: %s", f" ({corr})" if corr else "", why)
        if reply_to is not None:
            self._send(reply_to, corr, protocol.error_result(f"the fleet job was refused: {why}",
                                                             self.host, code))
        message.ack()

    def _take(self, queue_box: Optional[str], message: Any) -> None:
        try:
            msg = protocol.decode_job(message.body)
        except ProtocolError as exc:
            self._refuse(message, str(exc))
            return
        reply_to = protocol.usable_reply_to(message.properties.get("reply_to"))
        if reply_to is None:
            log.error("dropping job %s: its reply_to is not a client's reply queue "
                      "(vmim.reply.<id>)", msg.job_id)
            message.ack()
            return
        if queue_box is None and msg.box != ANY_FREE:
            self._refuse(message, f"a job on the shared queue {protocol.ANY_QUEUE} is an "
                         f"{ANY_FREE} job; this one names box '{msg.box[:80]}'")
            return
        if queue_box is not None and msg.box != queue_box:
            self._refuse(message, f"a job for box '{msg.box[:80]}' came on the queue of box "
                         f"'{queue_box}'")
            return
        job = Job(job_id=msg.job_id, box="" if queue_box is None else queue_box, run=msg.run,
                  reply_to=reply_to, message=message, deadline=msg.deadline,
                  any_free=queue_box is None)
        if self._answered_from_journal(job):
            return
        if not message.delivery_info.get("redelivered") and \
                time.time() > job.deadline + ACCEPT_GRACE:
            self._reply_now(job, protocol.error_result(
                "no worker took the job before its client's --lock-wait passed", self.host,
                EXIT_LOCKED))
            return
        if job.any_free:
            self._take_any(job)
        else:
            self._take_box(job)

    def _answered_from_journal(self, job: Job) -> bool:
        entry = self.journal.get(job.job_id)
        if entry is None or entry.get("state") != "done":
            return False
        log.info("job %s was done already (box %s): answering from the journal",
                 job.job_id, entry.get("box"))
        try:
            reply = protocol.decode_journal_reply(entry.get("reply"))
        except ProtocolError as exc:
            reply = protocol.error_result(f"the job's journal entry is unreadable: {exc}",
                                          self.host, EXIT_FAILED)
        self._send(job.reply_to, job.job_id, reply)
        job.message.ack()
        return True

    def _accept(self, job: Job) -> bool:
        """Tell the client who took the job; a client that gave up has no queue any more: the
        job is then dropped (acknowledged, not run)."""
        accepted = protocol.Reply("accepted", self.host, box=job.box, silence=self.silence)
        if self._send(job.reply_to, job.job_id, accepted, mandatory=True):
            return True
        log.warning("job %s for box %s: its client is gone; not running it", job.job_id, job.box)
        job.message.ack()
        return False

    def _take_box(self, job: Job) -> None:
        # Reserve the slot before publishing anything: while a publish waits for its confirm,
        # kombu runs the callbacks of new deliveries, and an any-free job must not pick it.
        busy = job.box in self.jobs  # an any-free job of the fleet runs there: wait for it
        (self.waiting if busy else self.jobs)[job.box] = job
        if not self._accept(job):
            (self.waiting if busy else self.jobs).pop(job.box, None)
            return
        if not busy:
            self._start(job)

    def _take_any(self, job: Job) -> None:
        box = self._free_slot() if time.monotonic() >= self.any_paused_until else None
        if box is None:  # nothing really free: give it back for another worker
            job.message.requeue()
            self.any_paused_until = time.monotonic() + RETRY_ANY  # the main loop cancels
            return
        job.box = box
        self.jobs[box] = job  # reserved before any publish (see _take_box)
        if not self._accept(job):
            self.jobs.pop(box, None)
            return
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
        self.journal.begin(job.job_id, job.box, job.run.to_dict(protocol.JOB_REQUEST_FIELDS))
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
        """In a job thread: run the job and hand its reply to the main loop — always, even
        when the worker fails to run it (the slot's reservation ends with the reply)."""
        try:
            reply = self._run_command(job)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the client gets an answer
            log.exception("job %s: box %s: the worker failed to run it", job.job_id, job.box)
            reply = replace(protocol.error_result(f"the worker failed to run the job: {exc!r}",
                                                  self.host, EXIT_FAILED), box=job.box)
        self.events.put(("reply", job, reply))

    def _run_command(self, job: Job) -> protocol.Reply:
        """The child for the job's slot: its stderr streamed to the client, its JSON doc and
        exit code the reply. The run is the client's request for this slot only, with the
        lock wait that is left of the client's deadline."""
        left = max(0, min(int(job.deadline - time.time()), 7 * 24 * 3600))
        run = BoxRun(replace(job.run.request, boxes=(job.box,), lists=()),
                     replace(job.run.options, json=True, jobs=1, lock_wait=left))
        log.info("job %s: box %s: %s", job.job_id, job.box,
                 ", ".join(run.request.actions) or "print-xml")
        try:
            env = protocol.child_env()
            env[lease.ENV_LEASE] = self._lease_path(job)  # stale: the job stops before a step
            env[lease.ENV_TTL] = str(2 * self.heartbeat)  # when the broker hands it on
            lease.renew(env[lease.ENV_LEASE])
            job.proc = self._run_child(run, env=env)
        except OSError as exc:
            return replace(protocol.error_result(f"cannot start the job: {exc}", self.host,
                                                 EXIT_ENVIRONMENT), box=job.box)
        proc = job.proc
        stdout = proc.stdout
        assert stdout is not None and proc.stderr is not None
        out: List[bytes] = []
        reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
        reader.start()
        lines: List[str] = []
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            self.events.put(("log", job, line))
        reader.join()
        code = proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self._lease_path(job))
        try:
            doc = json.loads(b"".join(out) or b"{}")
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if code < 0:  # killed by a signal: as the shell reports it
            code = 128 - code
        doc["host"] = self.host
        if job.any_free:  # the slot claimed for it
            doc["claimed"] = job.box
        return protocol.Reply("result", self.host, box=job.box, exit_code=min(code, 255),
                              doc=doc, stderr=tuple(lines))

    def _reply_now(self, job: Job, reply: protocol.Reply) -> None:
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
                if not job.aborted:
                    self._send(job.reply_to, job.job_id,
                               protocol.Reply("log", self.host, box=job.box, line=line))
            elif kind == "reply":
                _, job, reply = event
                self._finish(job, reply)
            elif kind == "list":
                _, reply_to, corr, reply = event
                self._send(reply_to, corr, reply)

    def _finish(self, job: Job, reply: protocol.Reply) -> None:
        if job.aborted:  # the broker was lost: the job may run elsewhere; say nothing
            self.journal.forget(job.job_id)
        else:
            self.journal.finish(job.job_id, job.box, reply.as_dict())
            if not self._send(job.reply_to, job.job_id, reply, mandatory=True):
                # the client is reconnecting (a broker restart): try again for a while
                self.undelivered.append((time.monotonic() + REDELIVER, job.reply_to,
                                         job.job_id, reply))
            job.message.ack()
            log.info("job %s: box %s: exit %s", job.job_id, job.box, reply.exit_code)
        if self.jobs.get(job.box) is job:
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
        self._reply_now(job, replace(protocol.error_result(
            f"box '{job.box}' is busy with another job of the fleet; try again later or wait "
            "with --lock-wait S", self.host, EXIT_LOCKED), box=job.box))

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

    def _on_control(self, message: Any) -> None:
        """A list request on the vmim.control fanout (no acknowledgement: a fanout copy is
        this worker's own). One that does not decode is ignored, with a line in the log."""
        try:
            req = protocol.decode_list_request(message.body)
            reply_to = protocol.usable_reply_to(message.properties.get("reply_to"))
            if reply_to is None:
                raise ProtocolError("its reply_to is not a client's reply queue")
        except ProtocolError as exc:
            log.warning("ignoring a list request: %s", exc)
            return
        except Exception:  # noqa: BLE001 - one bad message must not stop the worker
            log.exception("worker %s: internal error on a list request; ignoring it", self.host)
            return
        self._send(reply_to, req.job_id, protocol.Reply("here", self.host))
        threading.Thread(target=self._run_list, args=(req.lists, reply_to, req.job_id),
                         daemon=True).start()

    def _run_list(self, lists: Tuple[str, ...], reply_to: str, corr: str) -> None:
        try:
            res = self._run_child(BoxRun(Request(lists=lists), RunOptions(json=True)),
                                  capture=True)
            try:
                doc = json.loads(res.stdout or b"{}")
            except ValueError:
                doc = {}
            reply = protocol.Reply("lists", self.host, exit_code=min(res.returncode, 255) if
                                   res.returncode >= 0 else 128 - res.returncode,
                                   doc=doc if isinstance(doc, dict) else {},
                                   stderr=tuple(res.stderr.decode("utf-8", "replace")
                                                .splitlines(True)))
        except Exception as exc:  # noqa: BLE001 - the client gets an answer, whatever happened
            log.exception("worker %s: the lists failed", self.host)
            reply = protocol.Reply("lists", self.host, exit_code=EXIT_FAILED,
                                   stderr=(f"the worker failed to make the lists: {exc!r}\n",))
        self.events.put(("list", reply_to, corr, reply))
