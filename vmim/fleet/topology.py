"""What the fleet declares on the broker, and how a worker consumes it.

The objects every host shares — the topic exchange of jobs (protocol.JOBS), the control
fanout (protocol.CONTROL) and the any-free queue `vmim.any` bound to the jobs exchange with
key `any` — are declared by the clients (ensure_shared(), on every connection: their user may
configure them, vmim.fleet.permissions), not by the hosts: a host's user that may declare them
may also delete them, or declare the jobs exchange again as a fanout and see every host's
jobs. A worker looks them up (a passive declare needs no permission) and waits until they are
there (declare_waiting); only a worker whose user may configure them (the one-user trial)
declares them itself, and logs an error saying so. On them a worker declares what is its own:

- one durable queue per slot, `vmim.host.<host>.box.<box>`, bound with the slot's key
  `box.<box>` (which the host's topic permissions allow for its own slots only), consumed
  with prefetch 1;
- a consumer on the shared any-free queue `vmim.any`, on only while a slot is free;
- an exclusive queue of its own on the vmim.control fanout for list requests, of at most
  CONTROL_LENGTH ready requests, consumed with acknowledgements and a prefetch of as many: a
  flood of list requests waits in the broker, where it is bounded, never in the worker.
  Its overflow is `reject-publish`: the broker refuses a request to a full queue (a client,
  which publishes with confirms, is told at once and exits 5, as when a worker answers busy);
  `drop-head` would drop the oldest, the request of a client still waiting for its answer.
  Its name is new on every connection, so an upgrade never meets one declared before with
  other arguments (PRECONDITION_FAILED).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence

from vmim.fleet import protocol
from vmim.fleet.lists import WAITING
from vmim.plan import ANY_FREE

log = logging.getLogger("vmim.fleet.worker")

#: ready list requests a worker's control queue holds (and as many more delivered, unacknowledged)
CONTROL_LENGTH = WAITING + 1
CONTROL_ARGUMENTS = {"x-max-length": CONTROL_LENGTH, "x-overflow": "reject-publish"}


class NotDeclared(Exception):
    """The fleet's shared exchanges and queue are not on the broker, and this user may not
    declare them (a host's: a client declares them when it first connects)."""


class Mismatch(Exception):
    """What the fleet shares is on the broker, declared with another type or arguments."""


NOT_DECLARED_POLL = 1.0  # seconds between a waiting worker's looks (declare_waiting)
REBIND = 10.0  # seconds between a worker's bindings of its slot queues again (rebind)

#: the outcomes of ensure_shared()
PRESENT, DECLARED, MISSING = "present", "declared", "missing"


@contextlib.contextmanager
def spare_channel(connection: Any) -> Iterator[Any]:
    """A channel for one attempt that may fail: a refusal or a missing object closes the
    channel it happens on (an AMQP channel error), never the worker's own; closed after."""
    channel = connection.channel()
    try:
        yield channel
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def serves(connection: Any, host: str, box: str) -> bool:
    """Whether `box` is a slot of `host` as the broker knows it: the host's queue for it is
    there. Only the host's user may declare that queue, and its permissions name each of its
    slots (vmim.fleet.permissions.host_grants): a host answering an any-free job, which any
    host may take, cannot claim another host's slot. A passive declare needs no permission.
    A queue its declarer made exclusive is there too (the broker answers RESOURCE_LOCKED);
    any other refusal proves nothing: not served, as far as this client can tell."""
    import amqp

    if protocol.host_name_problem(host):
        return False  # its queue names may be another host's
    with spare_channel(connection) as channel:
        try:
            channel.queue_declare(protocol.box_queue(host, box), passive=True)
        except amqp.exceptions.ResourceLocked:
            return True
        except amqp.exceptions.ChannelError as exc:
            log.debug("the broker's answer about queue %s: %s",
                      protocol.box_queue(host, box), exc)
            return False
    return True


def _shared(channel: Any, passive: bool) -> None:
    """Declare (or with `passive`, look up) the fleet's shared objects on `channel`, with the
    arguments every release declared them with (another would be PRECONDITION_FAILED)."""
    channel.exchange_declare(protocol.JOBS, protocol.JOBS_TYPE, durable=True,
                             auto_delete=False, passive=passive)
    channel.exchange_declare(protocol.CONTROL, "fanout", durable=True, auto_delete=False,
                             passive=passive)
    channel.queue_declare(protocol.ANY_QUEUE, durable=True, exclusive=False, auto_delete=False,
                          passive=passive)
    if not passive:
        channel.queue_bind(protocol.ANY_QUEUE, protocol.JOBS, protocol.ANY_KEY)


def ensure_shared(connection: Any, declare: bool = True, verify: bool = False) -> str:
    """Whether the fleet's shared objects are on the broker: PRESENT; DECLARED when they were
    not and this connection's user declared them now (`declare`); MISSING when they are not
    and it may not (or was not to). With `verify` (a client), present ones are declared again
    too, where this user may: a no-op, unless one was declared otherwise (the jobs exchange
    declared again as a fanout, under the permissions of an earlier release), which a passive
    declare does not see: Mismatch. Each attempt has a channel of its own: a missing object
    or a refusal closes the channel it happened on."""
    import amqp

    found = None
    for passive in (True, False) if declare else (True,):
        try:
            with spare_channel(connection) as channel:
                _shared(channel, passive)
            found = PRESENT if passive else DECLARED
            break
        except amqp.exceptions.NotFound:
            continue
        except amqp.exceptions.AccessRefused as exc:
            log.debug("may not declare the fleet's exchanges: %s", exc)
            return MISSING
    if found == PRESENT and verify:
        try:
            may_configure_shared(connection)
        except amqp.exceptions.PreconditionFailed as exc:
            raise Mismatch(f"what the fleet shares on the broker was declared otherwise than "
                           f"this release declares it ({exc}): delete what the broker names "
                           "(`rabbitmqadmin delete exchange name=NAME`, or the management UI) "
                           "and run a client again, which declares it anew") from None
    return found or MISSING


def may_configure_shared(connection: Any) -> bool:
    """Whether this connection's user may configure what every host shares (declared again
    as it is: a no-op when allowed; PreconditionFailed when it was declared otherwise)."""
    import amqp

    try:
        with spare_channel(connection) as channel:
            _shared(channel, passive=False)
        return True
    except amqp.exceptions.AccessRefused:
        return False


@dataclass
class Consumers:
    boxes: List[Any]  # one per slot, consuming
    any: Any  # vmim.any: not consuming yet (the worker turns it on while a slot is free)
    control: Any  # list requests, consuming


def declare(channel: Any, host: str, slots: Sequence[str],
            on_message: Callable[[Optional[str], Any], None],
            declare_shared: bool = True) -> Consumers:
    """Declare and consume: `on_message(box, message)` for each delivery (box: the slot of its
    queue, ANY_FREE for vmim.any, None for a list request). The shared objects missing:
    declared when `declare_shared` and this user may (a site that gives hosts and clients one
    user), else NotDeclared."""
    import kombu

    shared = ensure_shared(channel.connection, declare_shared)
    if shared == DECLARED or shared == PRESENT and may_configure_shared(channel.connection):
        log.error("worker %s: its broker user may declare and delete what every host shares "
                  "(%s, %s, %s): a compromised host could stop the fleet or read every host's "
                  "jobs; give it the host permissions of vmimagemanager worker "
                  "--print-permissions (docs/fleet.md)", host, protocol.JOBS, protocol.CONTROL,
                  protocol.ANY_QUEUE)
    if shared == MISSING:
        raise NotDeclared(f"the fleet's exchanges ({protocol.JOBS}, {protocol.CONTROL}) and "
                          f"queue {protocol.ANY_QUEUE} are not on the broker yet, and host "
                          f"{host}'s user may not declare them: a client declares them when "
                          "it first connects (any vmimagemanager --broker command)")
    # looked up, never declared here (passive): see the module's doc
    jobs = kombu.Exchange(protocol.JOBS, type=protocol.JOBS_TYPE, durable=True, passive=True)
    control = kombu.Exchange(protocol.CONTROL, type="fanout", durable=True, passive=True)
    boxes = []
    for box in slots:  # raw messages (on_message): protocol.decode_* reads them
        if not protocol.routable(box):
            log.error("slot %r is not served: a word '*' or '#' in its name would route the "
                      "jobs of other boxes to it on %s; rename it", box, protocol.JOBS)
            continue
        q = kombu.Queue(protocol.box_queue(host, box), jobs, routing_key=protocol.box_key(box),
                        durable=True)
        c = kombu.Consumer(channel, queues=[q], on_message=functools.partial(on_message, box),
                           prefetch_count=1, no_ack=False)
        c.qos(prefetch_count=1)  # per consumer (RabbitMQ): one job per slot at a time
        c.consume()
        boxes.append(c)
    anyq = kombu.Queue(protocol.ANY_QUEUE, no_declare=True)  # the clients' (ensure_shared)
    any_consumer = kombu.Consumer(channel, queues=[anyq],
                                  on_message=functools.partial(on_message, ANY_FREE),
                                  prefetch_count=1, no_ack=False)
    ctlq = kombu.Queue(f"vmim.control.{host}.{protocol.new_job_id()[:8]}", control,
                       exclusive=True, auto_delete=True, durable=False,
                       queue_arguments=CONTROL_ARGUMENTS)
    ctl = kombu.Consumer(channel, queues=[ctlq], on_message=functools.partial(on_message, None),
                         no_ack=False)
    ctl.qos(prefetch_count=CONTROL_LENGTH)
    ctl.consume()
    if binds_any_key(channel.connection, host, jobs):
        log.error("worker %s: its broker user may bind any routing key on %s: it can see the "
                  "jobs of every host; give it the topic permissions of its own slots "
                  "(vmimagemanager worker --print-permissions, docs/fleet.md)", host, jobs.name)
    return Consumers(boxes, any_consumer, ctl)


def declare_waiting(channel: Any, host: str, slots: Sequence[str],
                    on_message: Callable[[Optional[str], Any], None],
                    stopping: Callable[[], bool]) -> Consumers:
    """declare(), waiting on this connection while what every host shares is not on the
    broker: declared by this user if it may (tried once: a refusal is an error in the
    broker's log), then looked up every NOT_DECLARED_POLL seconds until a client has declared
    it; NotDeclared when `stopping()` says so meanwhile."""
    import time

    waiting = False
    while True:
        try:
            return declare(channel, host, slots, on_message, declare_shared=not waiting)
        except NotDeclared as exc:
            if not waiting:
                log.warning("worker %s: waiting: %s", host, exc)
                waiting = True
            if stopping():
                raise
            time.sleep(NOT_DECLARED_POLL)


def rebind(connection: Any, host: str, slots: Sequence[str]) -> bool:
    """Bind this host's slot queues to the jobs exchange again (a no-op while the bindings
    are there): a jobs exchange deleted and declared again (by a client, or an admin) has
    none, and the broker tells no consumer. False when the exchange is not there now."""
    import amqp

    try:
        with spare_channel(connection) as channel:
            for box in slots:
                if protocol.routable(box):
                    channel.queue_bind(protocol.box_queue(host, box), protocol.JOBS,
                                       protocol.box_key(box))
        return True
    except amqp.exceptions.NotFound:
        return False


def binds_any_key(connection: Any, host: str, jobs: Any) -> bool:
    """Whether this connection's user may bind a queue of its own to the jobs exchange with
    the key of a box that is no slot of any host (no topic permissions: any key)."""
    import amqp
    import kombu

    with spare_channel(connection) as channel:
        q = kombu.Queue(f"vmim.host.{host}.probe.{protocol.new_job_id()[:8]}", jobs,
                        routing_key=protocol.box_key(protocol.new_job_id()), exclusive=True,
                        auto_delete=True)(channel)
        try:
            q.queue_declare()
        except amqp.exceptions.AccessRefused as exc:  # not the topic check: no answer
            log.warning("worker %s: cannot tell whether its broker user may bind any routing "
                        "key: the probe queue was refused (%s); its permissions predate this "
                        "release? (vmimagemanager worker --print-permissions)", host, exc)
            return False
        try:
            q.queue_bind()
        except amqp.exceptions.AccessRefused:  # the topic permissions refuse a key that is
            # none of its slots; the refusal closed the channel: the probe goes on another
            with contextlib.suppress(Exception), spare_channel(connection) as other:
                other.queue_delete(q.name)
            return False
        q.delete()
        return True
