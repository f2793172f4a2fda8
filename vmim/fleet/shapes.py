"""The shape of the documents a client gets from workers — a job's result and a host's lists —
checked before the client reads a field of them (vmim.fleet.protocol checks the envelope of a
reply; this checks the JSON document inside). A document of another shape came from something
that is not a worker of this release (or a broken one): the client says so (exit 7) instead of
printing garbage or failing on a missing key."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from vmim.errors import HostEnvironmentError


class MalformedReply(HostEnvironmentError):
    """A worker's document of a shape the client does not read (exit 7)."""


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise MalformedReply(f"{where}: {what}")


def _optional(d: Dict[str, Any], key: str, kind: type, where: str) -> None:
    """d[key], when there, is of `kind` (an int is not a bool)."""
    value = d.get(key)
    if value is not None:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        _need(ok, where, f"{key} is not {'a number' if kind is int else kind.__name__}")


def check_result(doc: Any, host: str) -> Dict[str, Any]:
    """A job's result document as the client reads it (vmim.fleet.client._merge)."""
    where = f"the result from host {host}"
    _need(isinstance(doc, dict), where, "not an object")
    results = doc.get("results", [])
    _need(isinstance(results, list) and all(isinstance(r, dict) for r in results), where,
          "results is not a list of objects")
    _optional(doc, "claimed", str, where)
    _optional(doc, "error", dict, where)
    _optional(doc, "expected_exit_code", int, where)
    for key in ("plan", "xml"):
        _optional(doc, key, dict, where)
    for box, plan in (doc.get("plan") or {}).items():
        _need(isinstance(plan, dict), where, f"the plan of {str(box)[:80]} is not an object")
        steps = plan.get("steps", [])
        _need(isinstance(steps, list) and all(isinstance(s, dict) for s in steps), where,
              f"the steps of {str(box)[:80]} are not a list of objects")
        _optional(plan, "expected_exit_code", int, where)
    _need(all(isinstance(x, str) for x in (doc.get("xml") or {}).values()), where,
          "xml is not text")
    return doc


def check_lists(doc: Any, lists: Sequence[str], host: str) -> Dict[str, Any]:
    """A host's lists document as the client reads it (vmim.fleet.client._print_fleet_lists):
    each asked-for list a list; free: names; the others: objects with a name."""
    where = f"the lists from host {host}"
    _need(isinstance(doc, dict), where, "not an object")
    for what in lists:
        items = doc.get(what, [])
        _need(isinstance(items, list), where, f"{what} is not a list")
        if what == "free":
            _need(all(isinstance(x, str) for x in items), where, "free is not a list of names")
            continue
        for item in items:
            _need(isinstance(item, dict) and isinstance(item.get("name"), str), where,
                  f"an entry of {what} is not an object with a name")
            for key in ("domain", "staged", "incomplete"):
                _optional(item, key, dict, where)
            if item.get("locked"):
                _need(isinstance(item["locked"], dict), where, "locked is not an object")
            _optional(item, "size", int, where)
    return doc
