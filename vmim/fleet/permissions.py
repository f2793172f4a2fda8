"""The broker users of a fleet and what each may do: the `rabbitmqctl` commands a site runs for
a host's user and a client's user (docs/fleet.md, "Users and permissions"), made here only, so
that the docs, `vmimagemanager worker --print-permissions` and the fleet tests say the same.

- A host's user is named as the host (`--host-name`). A worker sets the AMQP `user_id` of its
  replies, which RabbitMQ checks against the connection's user (a lie is refused, 406): a
  client believes a reply in the name of host H only from user H (vouched()).
- A host's user may bind queues to the jobs exchange (a topic exchange, protocol.JOBS) only
  with the routing keys of its own slots and `any`: RabbitMQ checks the key of a binding on a
  topic exchange against the user's topic read permission, so a compromised host can neither
  see copies of another host's jobs nor take them; it may not publish jobs at all.
- A client's user may publish jobs and list requests, own its reply queues and declare the
  objects every host shares (a host's user may not: it could delete them): it can re-image
  every slot of the fleet, so its replies are believed whatever host they name.
"""

from __future__ import annotations

import re
import shlex
from typing import Iterable, List, Optional, Tuple

from vmim.fleet import protocol

Grants = Tuple[str, str, str]  # configure, write, read: regular expressions over names


def host_user(host: str) -> str:
    """The broker user of host `host`: its name."""
    return host


def vouched(host: str, user_id: Optional[str], own_user: str) -> bool:
    """Whether a reply in the name of `host` that the broker delivered with `user_id` (the
    validated publisher; None: not given) may be believed by a client logged in as
    `own_user`: it came from the host's own user, or from the client's own (which can do
    anything a host can: a site that gives hosts and clients one user)."""
    return user_id is not None and user_id in (host_user(host), own_user)


def _names(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in words)


def host_grants(host: str, boxes: Iterable[str]) -> Grants:
    """A host's user: its own slot queues (`boxes`, named one by one), its probe and control
    queues (a hex id after its name), reading vmim.any, binding its own queues to the jobs
    exchange (only with its own keys: host_topic_grants) and the control fanout, and the
    default exchange to answer clients. It configures none of the objects every host shares
    (the jobs exchange, the control fanout, vmim.any): that would let it delete them, or
    declare the jobs exchange again as a fanout, which no topic permission guards, and see
    every host's jobs (vmim.fleet.topology). Every name is matched whole: host `web` gets
    nothing of host `web.prod` (`vmim.host.web.prod.box.x` is not `vmim.host.web.` and then
    anything)."""
    h = re.escape(host)
    own = rf"^vmim\.host\.{h}\.box\.({_names(boxes)})$|^vmim\.host\.{h}\.probe\.[0-9a-f]+$"
    control = rf"^vmim\.control\.{h}\.[0-9a-f]+$"
    shared = rf"^({_names([protocol.JOBS, protocol.CONTROL, protocol.ANY_QUEUE])})$"
    return rf"{own}|{control}", rf"{own}|{control}|^amq\.default$", rf"{own}|{control}|{shared}"


def host_topic_grants(boxes: Iterable[str]) -> Tuple[str, str]:
    """write, read on the jobs exchange for a host whose slots are `boxes`: it publishes no
    job; it binds the keys of its own slots and `any` only."""
    keys = [protocol.box_key(b) for b in boxes if protocol.routable(b)] + [protocol.ANY_KEY]
    return "^$", f"^({_names(keys)})$"


def client_grants() -> Grants:
    """A client's user: its reply queues; it declares the objects every host shares (the
    jobs exchange, the control fanout, vmim.any and its binding: vmim.fleet.topology),
    publishes on the jobs exchange, the control fanout and the default exchange."""
    shared = _names([protocol.JOBS, protocol.CONTROL, protocol.ANY_QUEUE])
    return (rf"^vmim\.reply\..*|^({shared})$",
            rf"^({shared})$|^amq\.default$",
            rf"^vmim\.reply\..*|^{re.escape(protocol.JOBS)}$")


def client_topic_grants() -> Tuple[str, str]:
    """write, read on the jobs exchange for a client: it publishes with any key; it binds
    vmim.any's key only (its read on the exchange is for that binding: with no topic
    permissions a client user could bind a queue of its own with `#` and read the jobs of
    every other client user)."""
    return ".*", f"^{re.escape(protocol.ANY_KEY)}$"


def commands(host: str, boxes: Iterable[str], vhost: str = "/") -> List[str]:
    """The rabbitmqctl commands that give host `host` (serving `boxes`) its user, and a client
    user (`ci`) its own; passwords are the site's to choose."""
    user, q = host_user(host), shlex.quote
    boxes = list(boxes)
    out = [f"# host {host}: its own slot queues, vmim.any, answers to clients; declares"
           " nothing shared"]
    out.append(f"rabbitmqctl add_user {q(user)} {q('secret-' + user)}")
    out.append(_command(f"set_permissions -p {q(vhost)} {q(user)}", host_grants(host, boxes)))
    out.append(_command(f"set_topic_permissions -p {q(vhost)} {q(user)} {protocol.JOBS}",
                        host_topic_grants(boxes)))
    out += [f"# slot {b!r}: a word '*' or '#' in its name routes other boxes' jobs to it; "
            "rename it" for b in boxes if not protocol.routable(b)]
    out += ["# the clients: publish jobs and list requests, own their reply queues, declare"
            " what is shared",
            "rabbitmqctl add_user ci secret-ci",
            _command(f"set_permissions -p {q(vhost)} ci", client_grants()),
            _command(f"set_topic_permissions -p {q(vhost)} ci {protocol.JOBS}",
                     client_topic_grants())]
    return out


def _command(head: str, grants: Iterable[str]) -> str:
    """One rabbitmqctl command, its regular expressions one a line."""
    return " \\\n    ".join([f"rabbitmqctl {head}"] + [shlex.quote(g) for g in grants])
