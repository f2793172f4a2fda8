"""The fleet's lists, as a client asks them: a request on the control fanout, which every
live worker receives; each says it is there, then sends its lists; they are printed as one
report with a HOST column (docs/fleet.md)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, List, Sequence, Set, TextIO, Tuple

from vmim.errors import EXIT_ENVIRONMENT, EXIT_LOCKED, EXIT_OK, HostEnvironmentError, LockBusyError
from vmim.fleet import protocol, topology
from vmim.fleet.client import Client, Refused
from vmim.output import render_list
from vmim.terminal import safe

log = logging.getLogger("vmim.fleet.client")

LIST_WINDOW = 1.0  # seconds the live workers have to say they are there
LIST_TIMEOUT = 120.0


def run_lists(client: Client, lists: List[str], doc: Dict[str, Any], out: TextIO,
               as_json: bool) -> int:
    """Ask every live worker for its lists and print them together; the exit code is the
    highest of the hosts' (a host busy with the lists of other clients: 5), 7 when a host that
    said it was there sent no lists in time."""
    corr = protocol.new_job_id()
    request = protocol.ListRequest(corr, tuple(lists))
    client.broadcast.add(corr)
    if client.shared == topology.MISSING or \
            not client.publish(request.encode(), corr, protocol.CONTROL, "", mandatory=False):
        raise HostEnvironmentError(client.never_started(
            f"no worker has ever started at {client.spec.shown}"))
    hosts: Set[str] = set()  # a host saying "here" twice is one host
    answers: Dict[str, protocol.Reply] = {}
    refused: Dict[str, str] = {}  # host -> why its own reply was malformed
    window = time.monotonic() + LIST_WINDOW
    final = time.monotonic() + LIST_TIMEOUT
    while len(answers) + len(set(refused) - set(answers)) < len(hosts) or \
            time.monotonic() < window:
        got = client.wait(window if time.monotonic() < window else final)
        if got is None:
            if time.monotonic() >= final:
                break
            continue
        c, reply = got
        if c != corr:
            continue
        if isinstance(reply, Refused):
            hosts.add(reply.host)
            refused[reply.host] = reply.why
        elif reply.type == "here":
            hosts.add(reply.host)
        elif reply.type == "lists":
            answers[reply.host] = reply
    for host in sorted(set(refused) - set(answers)):
        log.error("no lists from %s: %s", safe(host), refused[host])
    missing = sorted(h for h in hosts if h not in answers)
    if set(missing) - set(refused):
        log.error("no lists from %s within %d s",
                  ", ".join(sorted(set(missing) - set(refused))), LIST_TIMEOUT)
    # one worker's queue of requests was full (reject-publish): the broker refused the
    # request as a whole, though every other worker's queue took it: the others are printed
    full = corr in client.nacked
    if full and not hosts:
        raise LockBusyError(f"no worker answered at {client.spec.shown}, and a worker's queue "
                            "of list requests is full: busy or stalled; try again later")
    if full:
        log.error("the broker at %s refused the request for a queue on %s: a worker's queue "
                  "of list requests is full (busy with the lists of other clients, or "
                  "stalled): that host's lists may be missing; try again later",
                  client.spec.shown, protocol.CONTROL)
    if not hosts and client.shared == topology.DECLARED:  # this client declared the fleet
        raise HostEnvironmentError(client.never_started(
            f"no worker has ever started at {client.spec.shown}"))
    if not hosts:  # an empty list would say "no slots": it is "nobody to ask"
        raise HostEnvironmentError(f"no worker answered at {client.spec.shown} within "
                                   f"{LIST_WINDOW:.0f} s: are the workers running and "
                                   "connected? (`vmimagemanager worker`, docs/fleet.md)")
    for host in sorted(answers):
        if answers[host].exit_code:
            for line in "".join(answers[host].stderr).rstrip("\n").split("\n"):
                sys.stderr.write(f"{safe(host)}: {line}\n")  # each line under its host
    report_lists(lists, answers, doc, out, as_json)
    codes = [a.exit_code for a in answers.values()]
    if missing:
        codes.append(EXIT_ENVIRONMENT)
    if full:
        codes.append(EXIT_LOCKED)
    return max(codes, default=EXIT_OK)


def report_lists(lists: Sequence[str], replies: Dict[str, protocol.Reply], doc: Dict[str, Any],
                 out: TextIO, as_json: bool) -> None:
    """The lists of every host as one report: each row carrying its host (an image or insert
    of a store several hosts share: once, with its "hosts"); as text, the local tables
    (vmim.output) with a HOST column in front."""
    doc["hosts"] = sorted(replies)
    for what in lists:
        rows: List[Dict[str, Any]] = []
        seen: Dict[Tuple, Dict[str, Any]] = {}
        for host in sorted(replies):
            for item in replies[host].doc.get(what, []):
                if what == "free":
                    rows.append({"name": item, "host": host})
                    continue
                item = dict(item, host=host)
                if what in ("images", "inserts"):  # a store shared by several hosts: once
                    k = (item.get("name"), item.get("path"), item.get("size"), item.get("mtime"))
                    if k in seen:
                        seen[k]["hosts"].append(host)
                        continue
                    item["hosts"] = [host]
                    seen[k] = item
                rows.append(item)
        if as_json:
            if what == "free":
                doc["free"] = [r["name"] for r in rows]
                doc["free_by_host"] = {h: [r["name"] for r in rows if r["host"] == h]
                                       for h in sorted(replies)}
            else:
                doc[what] = rows
            continue
        render_list(what, [r["name"] for r in rows] if what == "free" else rows, out,
                    hosts=[",".join(r["hosts"]) if "hosts" in r else r["host"] for r in rows])
