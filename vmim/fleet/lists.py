"""A worker's fleet lists (`--broker ... -l/-L/-f`): the list requests of the clients, served one
at a time. Any broker client may publish list requests on the vmim.control fanout, and each one
costs the worker a child process (libvirt, the image store): they are served in the order they
came, one child at a time, with at most WAITING requests waiting; one more is answered at once
with exit 5 (busy, retry later), and a list child that runs past LIST_TIMEOUT is killed and
answered with exit 7. What the worker has not read yet waits in the broker, bounded there
(vmim.fleet.topology): a flood is refused by the broker, not read by the worker. Pure
bookkeeping here (no broker, no processes): the worker runs the children
(vmim.fleet.children) and publishes the answers."""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Deque, Optional, Tuple

from vmim.errors import EXIT_LOCKED, ProtocolError
from vmim.fleet import protocol

log = logging.getLogger("vmim.fleet.worker")

WAITING = 8  # list requests that may wait for the one being served
LIST_TIMEOUT = 60.0  # seconds a list child may run


@dataclass(frozen=True)
class ListJob:
    """A client's list request: what to list, where to answer, under which correlation id."""

    lists: Tuple[str, ...]
    reply_to: str
    corr: str


class ListQueue:
    """The list request being served (at most one) and those waiting (at most `waiting`)."""

    def __init__(self, waiting: int = WAITING):
        self.limit = waiting
        self.serving: Optional[ListJob] = None
        self.waiting: Deque[ListJob] = collections.deque()

    def offer(self, job: ListJob) -> bool:
        """Take a request (to serve or to wait); False when the queue is full: answer busy."""
        if self.serving is not None and len(self.waiting) >= self.limit:
            return False
        self.waiting.append(job)
        return True

    def next(self) -> Optional[ListJob]:
        """The request to serve now, when none is being served and one waits (it is then the
        one being served until done())."""
        if self.serving is not None or not self.waiting:
            return None
        self.serving = self.waiting.popleft()
        return self.serving

    def done(self) -> None:
        """The request being served was answered."""
        self.serving = None

    def clear(self) -> None:
        """Forget the waiting requests (the broker was lost: their clients ask again)."""
        self.waiting.clear()


def decode(message: Any, host: str) -> Optional[ListJob]:
    """A list request from the control fanout, or None (logged) when it does not decode or
    names no client's reply queue: such a message is ignored."""
    try:
        protocol.check_list_route(getattr(message, "delivery_info", None) or {})
        req = protocol.decode_list_request(message.body)
        reply_to = protocol.usable_reply_to(message.properties.get("reply_to"))
        if reply_to is None:
            raise ProtocolError("its reply_to is not a client's reply queue")
    except ProtocolError as exc:
        log.warning("ignoring a list request: %s", exc)
        return None
    except Exception:  # noqa: BLE001 - one bad message must not stop the worker
        log.exception("worker %s: internal error on a list request; ignoring it", host)
        return None
    return ListJob(req.lists, reply_to, req.job_id)


def busy(host: str) -> protocol.Reply:
    """The answer to a list request that finds the queue full (the client exits 5)."""
    return protocol.Reply("lists", host, exit_code=EXIT_LOCKED, stderr=(
        f"host {host} is busy with the lists of other clients; try again later\n",))


class ListServer(ListQueue):
    """A worker's list requests: `send(reply_to, corr, reply)` publishes (main thread only),
    `put` hands a finished list to the main loop, which calls answered()."""

    def __init__(self, host: str, children: Any, put: Callable[[tuple], None],
                 send: Callable[[str, Optional[str], protocol.Reply], Any],
                 waiting: int = WAITING):
        super().__init__(waiting)
        self.host, self.children, self.put, self.send = host, children, put, send

    def request(self, message: Any) -> None:
        """A list request on the vmim.control fanout: served in turn, or answered busy; then
        acknowledged, whatever it held (the broker keeps the requests not yet read: at most
        vmim.fleet.topology.CONTROL_LENGTH, and as many delivered unacknowledged)."""
        try:
            job = decode(message, self.host)
            if job is None:
                return
            self.send(job.reply_to, job.corr, protocol.Reply("here", self.host))
            if not self.offer(job):
                log.warning("list request %s: %d waiting already; answering busy", job.corr,
                            len(self.waiting))
                self.send(job.reply_to, job.corr, busy(self.host))
            self.start_next()
        finally:
            message.ack()

    def answered(self, job: ListJob, reply: protocol.Reply) -> None:
        self.done()
        self.send(job.reply_to, job.corr, reply)
        self.start_next()

    def start_next(self) -> None:
        job = self.next()
        if job is not None:
            threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def _run(self, job: ListJob) -> None:
        self.put(("list", job, self.children.lists(job.lists, self.host, LIST_TIMEOUT)))
