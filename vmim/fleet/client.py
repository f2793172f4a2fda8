"""The client side of `--broker`: box actions go to the worker of the box's host, lists to
every live worker; output, --json (with `host`) and exit codes are those of a local run."""

from __future__ import annotations

import logging
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Set, TextIO, Tuple

from vmim import fleet, signals
from vmim.config import Config
from vmim.errors import (
    EXIT_OK,
    HostEnvironmentError,
    LockBusyError,
    ProtocolError,
    StateError,
    VmimError,
)
from vmim.fleet import permissions, protocol, topology, transport
from vmim.invocation import BoxRun, Invocation, RunOptions
from vmim.output import render_plans
from vmim.plan import Plan, Request
from vmim.terminal import safe

log = logging.getLogger("vmim.fleet.client")

ACCEPT_GRACE = 5.0  # seconds past --lock-wait that a job may take to reach a worker
#: seconds a client that declared the fleet's exchanges gives waiting workers to bind
FRESH_WAIT = 2.5
RECONNECT = 120.0  # seconds a waiting client waits for a lost broker to come back
JOB_TTL = 24 * 3600.0  # seconds a job may stay in the broker past --lock-wait: long enough
# for a redelivery (a killed worker's job keeps its expiry when it is requeued; RabbitMQ drops
# it then), short enough that a queue of a host that never comes back does not grow forever.
SILENCE = 35.0  # seconds without word about a taken job, when the worker does not say


def broker_of(inv: Invocation, cfg: Optional[Config]) -> Optional[transport.BrokerSpec]:
    """--broker, else $VMIM_BROKER, else broker in the config (cfg: the loaded config, None
    when it could not be loaded); None: run here."""
    url = fleet.broker_url(inv.broker, cfg)
    if not url:
        return None
    if cfg is not None:
        return transport.BrokerSpec(url, cfg.broker_ca, cfg.broker_cert, cfg.broker_key)
    return transport.BrokerSpec(url)


def _login_refused(exc: BaseException) -> bool:
    """Whether the broker answered and refused (the login, or a reply queue: not its
    publishes, which Client._publish reads), rather than could not be reached."""
    refusals = transport.refusals()
    return bool(refusals) and isinstance(exc, refusals) or "ACCESS_REFUSED" in str(exc)


@dataclass(frozen=True)
class Refused:
    """A host's own reply to a list request that is malformed: its answer, an error."""

    host: str
    why: str


class Client:
    def __init__(self, spec: transport.BrokerSpec):
        import kombu

        self.spec = spec
        # (correlation id, Reply, or the error that it is: ProtocolError, HostEnvironmentError)
        self.inbox: List[Tuple[str, Any]] = []
        self.awaited: Set[str] = set()  # the correlation ids of what this client published
        # those of list requests: every host sees them (the control fanout), so a reply to one
        # that is malformed or not from the host it names is dropped, not the end of the run
        self.broadcast: Set[str] = set()
        self.nacked: Set[str] = set()  # those a full queue of some worker refused
        # named by the client, so that it can declare it again after a broker restart
        self.reply_to = f"vmim.reply.{protocol.new_job_id()}"
        self.reply_q = kombu.Queue(self.reply_to, exclusive=True, auto_delete=True,
                                   durable=False)
        self.conn = transport.connection(spec)
        self.user = self.conn.userid  # a reply from this user is believed (permissions.vouched)
        try:
            transport.connect(self.conn)
            self._reopen()
            # a client's to declare, not a host's; not PRESENT: no worker has served here
            self.shared = topology.ensure_shared(self.conn, verify=True)
            if self.shared == topology.DECLARED:  # workers may be waiting for them: one look
                log.info("declared the fleet's exchanges at %s; giving waiting workers %.0f s "
                         "to bind", spec.shown, FRESH_WAIT)
                signals.sleep(FRESH_WAIT)
        except topology.Mismatch as exc:
            raise HostEnvironmentError(f"the broker at {spec.shown}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - socket, AMQP, TLS errors and refusals alike
            err = self._error(exc, "cannot reach the broker at")
            if err is exc and not isinstance(exc, VmimError):
                err = transport.BrokerLost(f"cannot reach the broker at {spec.shown}: {exc}")
            raise err from None

    def close(self) -> None:
        transport.close(self.conn)

    def never_started(self, head: str) -> str:
        """`head` and why, for a fleet whose exchanges were not there when this client came."""
        return head + (f": the fleet's exchanges are not on the broker, and user {self.user} "
                       "may not declare them (give it the client permissions of `vmimagemanager "
                       "worker --print-permissions`)" if self.shared == topology.MISSING else
                       ": start `vmimagemanager worker` on the hosts (docs/fleet.md)")

    def _on_reply(self, message: Any) -> None:
        corr = message.properties.get("correlation_id")
        if corr not in self.awaited:  # not an answer to us: whatever it holds, it is not read
            log.debug("ignoring a reply to %r, which this client did not ask", corr)
            return
        user = message.properties.get("user_id")
        sender = safe(str(user)) if user else "(none)"
        try:
            reply: Any = protocol.decode_reply(message.body)
        except ProtocolError as exc:  # a worker of another version, or not a worker at all
            reply = exc  # wait() says so: exit 7
            if corr in self.broadcast:
                host = protocol.reply_host(message.body)
                if host is None or not permissions.vouched(host, user, self.user):
                    log.error("dropped a malformed reply to the list request from broker user "
                              "%s: %s", sender, exc)
                    return
                reply = Refused(host, str(exc))  # that host's answer: an error
        else:
            if not permissions.vouched(reply.host, user, self.user):
                why = (f"a reply in the name of host {safe(reply.host)} came through the broker "
                       f"at {self.spec.shown} from broker user {sender}, not from the host's "
                       f"user {safe(permissions.host_user(reply.host))}: refused (a host "
                       "answers as its own user, docs/fleet.md)")
                if corr in self.broadcast:
                    log.error("%s", why)
                    return
                reply = HostEnvironmentError(why)  # wait() raises it: exit 7
        self.inbox.append((corr, reply))

    def publish(self, body: bytes, job_id: str, exchange: str, routing_key: str,
                expiration: Optional[float] = None, mandatory: bool = True) -> bool:
        """Persistent, confirmed; False when no queue took it (mandatory)."""
        self.awaited.add(job_id)
        return bool(self._broker(self._publish, body, job_id, exchange, routing_key,
                                 expiration, mandatory))

    def _publish(self, body: bytes, job_id: str, exchange: str, routing_key: str,
                 expiration: Optional[float], mandatory: bool) -> bool:
        import amqp

        try:
            return self.publisher.publish(body, exchange=exchange, routing_key=routing_key,
                                          reply_to=self.reply_to, correlation_id=job_id,
                                          mandatory=mandatory, expiration=expiration,
                                          persistent=True)
        except amqp.exceptions.NotFound:  # the exchange is gone (deleted since we came)
            self._reopen()
            return False
        except transport.refusals() as exc:
            raise HostEnvironmentError(f"the broker at {self.spec.shown} refused: {exc}; "
                                       "does this user have write permission on "
                                       f"{exchange or 'amq.default'}?") from None
        except amqp.exceptions.MessageNacked:  # a queue of the message was full (its overflow:
            if job_id in self.broadcast:  # reject-publish, vmim.fleet.topology): the other
                self.nacked.add(job_id)  # workers' queues took it (gather.run_lists)
                return True
            raise LockBusyError(
                f"the broker at {self.spec.shown} refused the message: a worker's queue of "
                "requests is full (busy with the lists of other clients, or stalled); try "
                "again later") from None
        except socket.timeout:
            raise transport.BrokerLost(
                f"the broker at {self.spec.shown} did not confirm the message within "
                f"{transport.CONFIRM_TIMEOUT:.0f} s (a resource alarm: its disk or memory?)"
            ) from None

    def _broker(self, call: Any, *args: Any) -> Any:
        """A call on the broker connection, its errors read by _error()."""
        try:
            return call(*args)
        except Exception as exc:
            err = self._error(exc)
            if err is exc:
                raise
            raise err from None

    def _error(self, exc: BaseException, lost: str = "lost the broker at") -> BaseException:
        """The one reading of an error of the broker connection: a refused login or a lost
        (or unreachable) broker is exit 7 (BrokerLost), an OSError of this host is the host's
        (exit 7, saying so); anything else (a VmimError, a bug) stays as it is."""
        if isinstance(exc, VmimError):
            return exc
        if _login_refused(exc):
            return HostEnvironmentError(f"the broker at {self.spec.shown} refused user "
                                        f"{self.spec.user}: wrong password or permissions ({exc})")
        if transport.lost(exc):
            return transport.BrokerLost(f"{lost} {self.spec.shown}: {exc}")
        if isinstance(exc, OSError):
            return HostEnvironmentError(f"an error of this host, not of the broker at "
                                        f"{self.spec.shown}: {exc}")
        return exc

    def _reopen(self) -> None:
        """A channel error closes the channel: a new one, with a new reply queue."""
        import kombu

        self.channel = transport.channel(self.conn)
        self.publisher = transport.Publisher(self.channel)
        self.consumer = kombu.Consumer(self.channel, queues=[self.reply_q],
                                       on_message=self._on_reply, no_ack=True)
        self.consumer.consume()

    def reconnect(self, patience: float = RECONNECT) -> None:
        """The broker is gone: wait for it (a restart), then listen on the same reply queue."""
        transport.close(self.conn)
        log.warning("lost the broker at %s; waiting up to %.0f s for it", self.spec.shown,
                    patience)
        until = time.monotonic() + patience
        while True:
            self.conn = transport.connection(self.spec)
            try:
                transport.connect(self.conn)
                self._reopen()
                log.info("connected to %s again", self.spec.shown)
                return
            except Exception as exc:
                if not transport.lost(exc):
                    raise
                if time.monotonic() >= until:
                    raise transport.BrokerLost(
                        f"lost the broker at {self.spec.shown} and it did not come back "
                        f"within {patience:.0f} s: {exc}") from None
                signals.sleep(1.0)

    def wait(self, until: float) -> Optional[Tuple[str, protocol.Reply]]:
        """The next reply, or None when `until` (monotonic) has passed; a lost broker is
        waited for RECONNECT seconds at most (then BrokerLost, exit 7). A malformed reply is
        a HostEnvironmentError (exit 7)."""
        last_beat = time.monotonic()
        while not self.inbox:
            now = time.monotonic()
            if now >= until:
                return None
            try:
                with signals.waiting():  # a client holds nothing of a host: Ctrl-C stops it
                    self.conn.drain_events(timeout=max(0.01, min(0.2, until - now)))
            except socket.timeout:
                pass
            except Exception as exc:
                if not transport.lost(exc):
                    raise
                self.reconnect()
                continue
            if now - last_beat > 1.0:
                try:
                    self.conn.heartbeat_check()
                except Exception as exc:
                    if not transport.lost(exc):
                        raise
                    self.reconnect()
                last_beat = now
        corr, reply = self.inbox.pop(0)
        if isinstance(reply, ProtocolError):
            raise HostEnvironmentError(f"a malformed reply came through the broker at "
                                       f"{self.spec.shown}: {reply}")
        if isinstance(reply, VmimError):
            raise reply
        return corr, reply


def run(inv: Invocation, spec: transport.BrokerSpec, doc: Dict[str, Any], out: TextIO) -> int:
    client = Client(spec)
    req, opts = inv.request, inv.options
    try:
        code = EXIT_OK
        if req.boxes and (req.actions or opts.print_xml):
            code = _run_jobs(client, req, opts, doc, out)
        if req.lists:
            from vmim.fleet import gather

            code = max(code, gather.run_lists(client, list(req.lists), doc, out, opts.json))
        return code
    except BrokenPipeError:
        raise  # stdout's reader went away (the front end says nothing)
    except Exception as exc:
        err = client._error(exc)
        if err is exc:
            raise
        raise err from None
    finally:
        client.close()


def _run_jobs(client: Client, req: Request, opts: RunOptions, doc: Dict[str, Any],
              out: TextIO) -> int:
    from vmim.plan import ANY_FREE

    results: List[protocol.Reply] = []
    # one job per box; the worker's child always writes JSON, runs one box (jobs = 1)
    run = BoxRun(replace(req, boxes=(), lists=()), replace(opts, json=True, jobs=1))
    for box in req.boxes:
        job = protocol.Job(protocol.new_job_id(), box, time.time() + opts.lock_wait, run,
                           socket.gethostname())
        key = protocol.ANY_KEY if box == ANY_FREE else protocol.box_key(box)
        if box == ANY_FREE and client.shared == topology.MISSING:
            raise StateError(client.never_started(
                f"no worker of the fleet at {client.spec.shown} serves -b {ANY_FREE} (no "
                "worker has started there yet)"))
        if not client.publish(job.encode(), job.job_id, protocol.JOBS, key,
                              expiration=opts.lock_wait + JOB_TTL):
            if box == ANY_FREE:
                raise StateError(f"no worker of the fleet at {client.spec.shown} serves "
                                 f"-b {ANY_FREE} (no worker has started there yet)")
            raise StateError(f"unknown box '{box}': no worker of the fleet at "
                             f"{client.spec.shown} serves it (see --broker ... -l)")
        result = _follow(client, job, opts.lock_wait)
        if box == ANY_FREE and result.box and not topology.serves(client.conn, result.host,
                                                                  result.box):
            raise HostEnvironmentError(
                f"host {safe(result.host)} answered the -b {ANY_FREE} job as box "
                f"{safe(result.box)}, which is not one of its slots as far as the broker "
                f"shows (no queue {protocol.box_queue(result.host, result.box)} it could "
                "confirm): refused (docs/fleet.md)")
        if box == ANY_FREE and result.box and not opts.json:
            out.write(safe(result.box) + "\n")  # the slot that ran the job: one name, once
            out.flush()
        results.append(result)
        if result.exit_code in (130, 143):
            break
    return report_results(results, doc, opts.json, out)


def report_results(results: Sequence[protocol.Reply], doc: Dict[str, Any], as_json: bool,
                   out: TextIO) -> int:
    """The results of the jobs as one report, as a local run makes it, each result carrying its
    host (vmim.output draws it): the exit code of the command."""
    _merge(doc, [dict(r.doc, host=r.host) for r in results], as_json, out)
    bad = [r.exit_code for r in results if r.exit_code]
    return max(bad) if bad else EXIT_OK


def _follow(client: Client, job: protocol.Job, lock_wait: int) -> protocol.Reply:
    """Wait for the job's result, echoing its log lines. Exit 5 when no worker took it within
    --lock-wait; exit 7 when the worker that took it goes silent (killed, frozen, cut off) and
    no worker takes it up again in time: the client never waits forever."""
    accept_by: Optional[float] = time.monotonic() + lock_wait + ACCEPT_GRACE
    silent_by: Optional[float] = None
    silence = SILENCE
    taker: Optional[protocol.Reply] = None  # the last accepted: who runs the job now
    while True:
        # bounded: until taken, --lock-wait (+ grace); then the worker's silence limit
        until = silent_by if silent_by is not None else accept_by
        got = client.wait(until if until is not None else time.monotonic() + silence)
        if got is None:
            if taker is None:
                raise LockBusyError(
                    f"box '{job.box}': no worker took the job within {lock_wait} s "
                    "(its slot stayed busy, no slot was free, or its host is down); "
                    "try again later or wait with --lock-wait S")
            raise HostEnvironmentError(
                f"box '{job.box}': the worker of host {taker.host} that took the job (slot "
                f"{taker.box}) went silent: no word for {max(silence, lock_wait):.0f} s (killed, "
                "frozen or cut off from the broker) and no worker took the job up again; "
                "it may have been cut short: see the slot with --broker ... -l, and run it "
                "again (a worker that comes back does not run a job its client gave up)")
        corr, reply = got
        if corr != job.job_id:
            continue
        if reply.type == "accepted":
            taker, accept_by = reply, None
            silence = reply.silence or SILENCE
            log.debug("box %s: taken by %s (slot %s)", job.box, reply.host, reply.box)
        elif taker is not None and reply.host != taker.host:
            continue  # a worker that lost the job to another one: not ours to listen to
        if taker is not None:
            silent_by = time.monotonic() + max(silence, lock_wait)
        if reply.type == "log":
            _say(reply.line)
            sys.stderr.flush()
        elif reply.type == "result":
            if taker is None:  # answered from a journal, or refused: its lines were not streamed
                for line in reply.stderr:
                    _say(line)
            return reply


def _say(line: str) -> None:
    """A stderr line of the worker's run, as one line: a newline inside it would print a line
    of the worker's making that looks like one of this client's."""
    if line:
        sys.stderr.write(safe(line[:-1] if line.endswith("\n") else line) + "\n")


def _merge(doc: Dict[str, Any], docs: List[Dict[str, Any]], as_json: bool,
           out: TextIO) -> None:
    """One document as a local run makes it, every result carrying its host."""

    results: List[Any] = []
    for d in docs:
        host = d.get("host")
        for r in d.get("results", []):
            r["host"] = host
            results.append(r)
        for key in ("claimed", "plan", "xml", "expected_exit_code"):
            if key in d:
                if isinstance(d[key], dict) and isinstance(doc.get(key), dict):
                    doc[key].update(d[key])
                else:
                    doc[key] = d[key]
        if "error" in d:
            doc["error"] = d["error"]
    if results or any("results" in d for d in docs):
        doc["results"] = results
    hosts = [d.get("host") for d in docs]
    if len(hosts) == 1:
        doc["host"] = hosts[0]
    else:
        doc["hosts"] = hosts
    if as_json:
        return
    plans = doc.get("plan", {})
    if plans:  # as a local dry run prints them
        render_plans([Plan.from_dict(box, plan) for box, plan in plans.items()],
                     max((p.get("expected_exit_code", 0) for p in plans.values()), default=0),
                     out)
    for text in doc.get("xml", {}).values():
        out.write(text)
