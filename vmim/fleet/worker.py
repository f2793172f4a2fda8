"""`vmimagemanager worker`: serve this host's slots to the fleet.

One queue per slot (`vmim.host.<host>.box.<box>`, bound to `box.<box>` on `vmim.jobs.topic`),
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

import collections
import contextlib
import logging
import queue
import signal
import socket
import threading
import time
from typing import Any, Deque, List, Optional, Tuple

from vmim.errors import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    ProtocolError,
    VmimError,
)
from vmim.fleet import permissions, protocol, topology, transport
from vmim.fleet.children import Children
from vmim.fleet.journal import Journal
from vmim.fleet.lists import ListServer
from vmim.fleet.scheduler import Job, Slots, Undelivered
from vmim.plan import ANY_FREE

log = logging.getLogger("vmim.fleet.worker")

POLL = 0.05
REDELIVER = 120.0  # seconds a result is offered to a client that is reconnecting
RETRY_ANY = 1.0  # after giving back an any-free job (no slot really free): pause that long
ACCEPT_GRACE = 5.0  # a client waits that long past its deadline for its job to be taken
ABORT_WAIT = 300.0  # seconds the aborted jobs of a lost connection have to clean up


class Worker:
    def __init__(self, cfg: Any, spec: transport.BrokerSpec, host: str,
                 heartbeat: int = protocol.HEARTBEAT):
        self.cfg = cfg
        self.heartbeat = heartbeat
        self.spec = spec
        self.host = host
        self.journal = Journal(cfg.statedir)
        self.children = Children(cfg.path, cfg.statedir, 2 * heartbeat)
        self.events: queue.Queue[tuple] = queue.Queue()
        self.inbox: Deque[Tuple[Optional[str], Any]] = collections.deque()  # deliveries
        self.slots = Slots([b for b in cfg.slot_names if protocol.routable(b)])  # served
        self.stopping = False
        self.conn: Any = None
        self.publisher: Any = None
        self.box_consumers: List[Any] = []
        self.any_consumer: Any = None
        self.any_on = False
        self.any_paused_until = 0.0
        self.undelivered = Undelivered(REDELIVER)
        self.lists = ListServer(host, self.children, self.events.put, self._send)
        self.ping = max(1.0, min(5.0, heartbeat / 2))  # "running" to the clients, this often
        self.silence = 3.0 * heartbeat + 5  # a client gives a job up after that long unheard
        self.next_ping = 0.0
        self.next_rebind, self.unbound = 0.0, False  # unbound: the jobs exchange was gone
        self.last_beat = 0.0

    # ------------------------------------------------------------------ life cycle

    def _on_term(self, signum: int, _frame: Any) -> None:
        if self.stopping:  # a second SIGTERM: abort the running jobs (they clean up)
            log.warning("second %s: aborting the running jobs", signal.Signals(signum).name)
            for job in list(self.slots.running.values()):
                self._terminate(job)
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_term)
        self.recover()
        self.journal.prune()
        slots = ", ".join(self.cfg.slot_names) or "(none)"
        log.info("worker %s: slots %s; broker %s", self.host, slots, self.spec.shown)
        user = self.spec.user
        if user != permissions.host_user(self.host):
            log.warning("worker %s: broker user %s is not the host's (%s): clients that log in as "
                        "another user refuse its replies (docs/fleet.md)", self.host, user,
                        permissions.host_user(self.host))
        delay = 1.0
        while True:
            try:
                self._connect()
                log.info("worker %s: ready", self.host)
                delay = 1.0
                self._serve()
                break
            except Exception as exc:  # noqa: BLE001 - whatever it was, start over
                if isinstance(exc, topology.NotDeclared):
                    pass  # stopping while it waited for a client (_connect)
                elif isinstance(exc, transport.refusals()):
                    log.error("the broker at %s refused: %s (see the permissions in "
                              "docs/fleet.md)", self.spec.shown, exc)
                elif transport.lost(exc):
                    log.warning("lost the broker at %s (%s)", self.spec.shown, exc)
                elif isinstance(exc, (OSError, VmimError)):
                    log.error("worker %s: an error of this host, not of the broker: %s; "
                              "starting over", self.host, exc)
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
        """Before serving: release what a killed predecessor left (vmim.fleet.children)."""
        self.children.recover(self.journal, lambda box: self.cfg.slot(box) is not None)

    def _connect(self) -> None:
        self.conn = transport.connection(self.spec, self.heartbeat)
        transport.connect(self.conn)
        channel = transport.channel(self.conn)
        # the broker checks user_id against this connection's user: clients believe a reply
        # in the name of this host only from the host's user (vmim.fleet.permissions)
        self.publisher = transport.Publisher(channel, user_id=self.conn.userid)
        consumers = topology.declare_waiting(channel, self.host, self.cfg.slot_names,
                                             self._queue, lambda: self.stopping)
        self.box_consumers, self.any_consumer = consumers.boxes, consumers.any
        self.any_on = False
        self._update_any()

    def _drop_connection(self) -> None:
        """The broker is gone: every unacknowledged job may go to another worker now, so the
        running ones are aborted (their command cleans up as after SIGTERM) and forgotten."""
        running = list(self.slots.running.values())
        for job in running:
            if job.proc is not None:
                self._terminate(job)
        until = time.monotonic() + ABORT_WAIT  # their clean-up; then SIGKILL: never hang here
        for job in running:
            if job.thread is not None:
                job.thread.join(max(0.0, until - time.monotonic()))
                if job.thread.is_alive() and job.proc is not None:
                    log.error("job %s: box %s: its command did not end after SIGTERM; killing "
                              "it (release the slot with --release)", job.job_id, job.box)
                    job.proc.kill()
                    job.thread.join(10)
            self.journal.forget(job.job_id)
        self.slots.clear()
        while not self.events.empty():
            if self.events.get_nowait()[0] == "list":
                self.lists.done()  # its client asks again
        self.lists.clear()
        self.inbox.clear()  # unacknowledged: the broker hands them out again
        self._close()

    def _close(self) -> None:
        if self.conn is not None:
            transport.close(self.conn)
        self.conn = None

    def _serve(self) -> None:
        cancelled = False
        self.last_beat = 0.0
        while True:
            if self.stopping and not cancelled:
                log.info("stopping: no new jobs; %d running", len(self.slots.running))
                for c in self.box_consumers:
                    c.cancel()
                self._any(False)
                cancelled = True
            if self.stopping and not self.slots.busy():
                return
            try:
                self.conn.drain_events(timeout=POLL)
            except socket.timeout:
                pass
            self._tick()
            now = time.monotonic()
            if now >= self.next_ping:
                self.next_ping = now + self.ping
                self._ping()
            if now >= self.next_rebind:
                self.next_rebind = now + topology.REBIND
                self._rebind()
            self._handle_inbox()
            self._handle_events()
            for job in self.slots.expired(time.time()):
                self._expired(job)
            self._retry_replies()
            if not self.stopping:
                self._update_any()

    def _tick(self) -> None:
        """The heartbeat to the broker and the running jobs' leases, when due. A worker frozen
        past a heartbeat renews nothing: its jobs may be another worker's now."""
        now = time.monotonic()
        if now - self.last_beat <= min(1.0, self.heartbeat / 4):
            return
        away = now - self.last_beat if self.last_beat else 0.0
        self.conn.heartbeat_check()
        self.last_beat = now
        if away < self.heartbeat:
            self._renew_leases()

    # ------------------------------------------------------------------ publishing

    def _send(self, reply_to: str, corr: Optional[str], reply: protocol.Reply,
              mandatory: bool = False) -> bool:
        """Publish to a client's reply queue; False when the client is gone (mandatory)."""
        return self.publisher.reply(reply.encode(), routing_key=reply_to, correlation_id=corr,
                                    mandatory=mandatory)

    def _rebind(self) -> None:
        """Slot queues bound again: a jobs exchange deleted and declared anew has no bindings."""
        bound = topology.rebind(self.conn, self.host, self.cfg.slot_names)
        if bound == self.unbound:  # changed: said once
            log.log(logging.INFO if bound else logging.WARNING, "worker %s: the jobs exchange "
                    "%s %s", self.host, protocol.JOBS, "is back: slot queues bound again" if bound
                    else "is gone (deleted): no job reaches this host until a client declares it")
        self.unbound = not bound

    def _ping(self) -> None:
        """Word to the clients of the jobs this worker holds (running or waiting for their
        slot), so that a client can tell a long job from a worker that died."""
        for job in self.slots.held():
            if not job.aborted:
                self._send(job.reply_to, job.job_id,
                           protocol.Reply("running", self.host, box=job.box))

    # ------------------------------------------------------------------ jobs

    def _queue(self, queue_box: Optional[str], message: Any) -> None:
        """kombu's callback for every delivery: only queued here, handled by the main loop.
        A publish waits for the broker's confirm, and while it waits kombu delivers; a publish
        made from such a callback would wait inside the outer one, which then may never see
        its own confirm (the broker confirms several at once) and stop the worker."""
        self.inbox.append((queue_box, message))

    def _handle_inbox(self) -> None:
        while self.inbox:
            queue_box, message = self.inbox.popleft()
            self._tick()  # a burst must starve neither the heartbeat nor the leases
            if queue_box is None:
                self.lists.request(message)  # a list request on the control fanout
            else:
                self._on_message(queue_box, message)

    def _on_message(self, queue_box: str, message: Any) -> None:
        """A delivery on a slot's queue (queue_box) or on the any-free queue (ANY_FREE). Whatever
        it holds, it ends acknowledged, requeued for another worker or taken as a job; a
        bug here refuses the one message, it does not stop the worker or its jobs."""
        try:
            self._take(queue_box, message)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the worker
            if transport.lost(exc):
                raise  # the broker is gone: the main loop reconnects
            host = isinstance(exc, (OSError, VmimError))  # the host's error, not a bug
            log.log(logging.ERROR if host else logging.CRITICAL, "worker %s: %s on a message; "
                    "refusing it", self.host, "an error of this host" if host else
                    "internal error", exc_info=not host)
            if not message.acknowledged:
                self._refuse(message, f"an error of host {self.host}: {exc}" if host else
                             f"internal error in the worker: {exc!r}",
                             EXIT_ENVIRONMENT if host else EXIT_FAILED)

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

    def _take(self, queue_box: str, message: Any) -> None:
        try:
            msg = protocol.decode_job(message.body, queue_box, message.delivery_info or {})
        except ProtocolError as exc:
            self._refuse(message, str(exc))
            return
        reply_to = protocol.usable_reply_to(message.properties.get("reply_to"))
        if reply_to is None:
            log.error("dropping job %s: its reply_to is not a client's reply queue "
                      "(vmim.reply.<id>)", msg.job_id)
            message.ack()
            return
        any_free = msg.box == ANY_FREE
        job = Job(job_id=msg.job_id, box="" if any_free else msg.box, run=msg.run,
                  reply_to=reply_to, message=message, deadline=msg.deadline,
                  any_free=any_free)
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
        """A job id this worker knows: a redelivery of a job that is done is answered from the
        journal; a message that reuses the id of another job (or of a job held now) is
        refused with exit 2 — never run a second time, never answered with another's result."""
        entry = self.journal.get(job.job_id)
        held = any(j.job_id == job.job_id for j in self.slots.held())
        if not held and (entry is None or entry.get("state") != "done"):
            return False
        asked = protocol.journal_request(ANY_FREE if job.any_free else job.box, job.run)
        if held or entry is None or entry.get("request") != asked:
            log.error("job %s: its id is that of another job; refusing it", job.job_id)
            self._reply_now(job, protocol.error_result(
                f"job id {job.job_id} is in use by another job; a job needs an id of its own",
                self.host, EXIT_USAGE))
            return True
        log.info("job %s was done already (box %s): answering from the journal",
                 job.job_id, entry.get("box"))
        self._reply_now(job, protocol.decode_journal_reply(entry.get("reply"), self.host))
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
        now = self.slots.hold(job)  # reserved before any publish (see vmim.fleet.scheduler)
        if not self._accept(job):
            self.slots.drop(job)
            return
        if now:
            self._start(job)

    def _take_any(self, job: Job) -> None:
        late = time.time() > job.deadline
        box = self.children.free_slot(self.cfg, self.slots.idle()) \
            if late or time.monotonic() >= self.any_paused_until else None
        if box is None and late:  # its wait is over: answered, not handed on for a day
            self._reply_now(job, protocol.error_result(
                f"no worker took the job within its --lock-wait: no slot was free (host "
                f"{self.host} looked last); try again later or wait with --lock-wait S",
                self.host, EXIT_LOCKED))
            return
        if box is None:  # nothing really free: give it back for another worker
            job.message.requeue()
            self.any_paused_until = time.monotonic() + RETRY_ANY  # the main loop cancels
            return
        self.slots.claim(job, box)  # reserved before any publish
        if not self._accept(job):
            self.slots.drop(job)
            return
        self._start(job)

    def _start(self, job: Job) -> None:
        """Run the job in a thread; when that cannot start (its journal entry cannot be
        written, no thread), the job ends at once: answered (exit 7), its slot freed."""
        self.slots.running[job.box] = job
        try:
            self.journal.begin(job.job_id, job.box, protocol.journal_request(
                ANY_FREE if job.any_free else job.box, job.run))
            job.thread = threading.Thread(target=self._run_job, args=(job,), daemon=True)
            job.thread.start()  # the main loop stops consuming vmim.any when no slot is left
        except Exception as exc:  # noqa: BLE001 - an error of this host, not of the broker
            log.error("job %s: box %s: cannot start it: %s", job.job_id, job.box, exc)
            with contextlib.suppress(OSError, VmimError):
                self.journal.forget(job.job_id)
            self._finish(job, protocol.error_result(
                f"the worker of host {self.host} could not start the job: {exc}", self.host,
                EXIT_ENVIRONMENT, job.box), keep=False)

    def _renew_leases(self) -> None:
        for job in list(self.slots.running.values()):
            if job.proc is not None and job.proc.poll() is None:
                try:
                    self.children.renew_lease(job.job_id)
                except (OSError, VmimError) as exc:  # the job stops at its next step
                    log.warning("cannot renew the lease of job %s: %s", job.job_id, exc)

    def _run_job(self, job: Job) -> None:
        """In a job thread: run the job and hand its reply to the main loop — always, even
        when the worker fails to run it (the slot's reservation ends with the reply)."""
        try:
            reply = self.children.job_reply(job, self.host,
                                            lambda line: self.events.put(("log", job, line)))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the client gets an answer
            log.exception("job %s: box %s: the worker failed to run it", job.job_id, job.box)
            reply = protocol.error_result(f"the worker failed to run the job: {exc!r}",
                                          self.host, EXIT_FAILED, job.box)
        self.events.put(("reply", job, reply))

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
                _, job, reply = event
                self.lists.answered(job, reply)

    def _finish(self, job: Job, reply: protocol.Reply, keep: bool = True) -> None:
        if job.aborted:  # the broker was lost: the job may run elsewhere; say nothing
            self.journal.forget(job.job_id)
        else:
            try:
                if keep:
                    self.journal.finish(job.job_id, job.box, reply.as_dict())
            except (OSError, VmimError) as exc:  # the client gets its result all the same
                log.error("job %s: cannot keep its result in the journal: %s", job.job_id, exc)
            if not self._send(job.reply_to, job.job_id, reply, mandatory=True):
                # the client is reconnecting (a broker restart): try again for a while
                self.undelivered.add(job.reply_to, job.job_id, reply, time.monotonic())
            job.message.ack()
            log.info("job %s: box %s: exit %s", job.job_id, job.box, reply.exit_code)
        waiting = self.slots.done(job)
        if waiting is not None:
            if time.time() > waiting.deadline:
                self._expired(waiting)
            else:
                self._start(waiting)

    def _retry_replies(self) -> None:
        now = time.monotonic()
        for item in self.undelivered.due(now):
            _until, reply_to, job_id, reply = item
            if not self._send(reply_to, job_id, reply, mandatory=True) and \
                    not self.undelivered.keep(item, now):
                log.warning("job %s: its client did not come back; the result stays in the "
                            "journal", job_id)

    def _expired(self, job: Job) -> None:
        self._reply_now(job, protocol.error_result(
            f"box '{job.box}' is busy with another job of the fleet; try again later or wait "
            "with --lock-wait S", self.host, EXIT_LOCKED, job.box))

    def _terminate(self, job: Job) -> None:
        job.aborted = True
        if job.proc is not None and job.proc.poll() is None:
            job.proc.terminate()

    # ------------------------------------------------------------------ any-free

    def _update_any(self) -> None:
        self._any(bool(self.slots.idle()) and time.monotonic() >= self.any_paused_until)

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
