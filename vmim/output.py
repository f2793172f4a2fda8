"""What a command prints: tables, names made printable, the plans and the lists (stdout
only), for a local run and the fleet's alike."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO

from vmim.config import Config
from vmim.definition import drift_line
from vmim.domain import Hypervisor
from vmim.plan import Plan, Request, dry_run_summary
from vmim.progress import human_size
from vmim.terminal import safe

log = logging.getLogger(__name__)

PROG = "vmimagemanager"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Rows under headers, each cell one line of text (safe(): a value holding a newline or
    a control cannot start a line or rewrite the terminal, whoever reported it)."""
    lines = [[safe(c) for c in r] for r in [list(headers), *rows]]
    widths = [len(h) for h in lines[0]]
    for r in lines[1:]:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    for r in lines:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


# --------------------------------------------------------------------------- the one renderer
# Plans and lists are drawn from the report, the dicts of --json, here only: for a local run
# and for the fleet's (vmim.fleet.client), which adds a HOST column in front of each table.
# The fleet's come from workers (vmim.fleet.protocol checks their shape): whatever JSON value
# stands where a field should, a cell is text ("?" when it is not what the field holds).

BOX_HEADERS = ["NAME", "CONFIG", "STATE", "MOUNTED", "LOCKED", "DISK", "BASE", "INCOMPLETE",
               "STAGED"]
ENTRY_HEADERS = ["NAME", "FORMAT", "SIZE", "MODIFIED (UTC)", "DIRECTORY", "BASE OF"]
LOCKED_HEADERS = ["NAME", "PID", "COMMAND"]


def _text(value: Any, none: str = "-") -> str:
    """A scalar field as text: none for null, "?" for a list or an object."""
    if value is None:
        return none
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        try:
            return str(value)
        except ValueError:  # an int of more digits than str() makes
            return "?"
    return "?"


def _fields(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _size(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 80:
        return human_size(value)
    return "?"


def staged_text(staged: Any) -> str:
    """The STAGED column of a box row (vmim.standby.Staged.as_dict()): the image and when it
    was staged, or why it is not ready; else "-"."""
    if not isinstance(staged, Mapping):
        return "-"
    image = _text(staged.get("image"), "?")
    if staged.get("skip") is None:  # ready
        return f"{image} {_text(staged.get('finished'), '')[:16]}"
    return f"{image} ({_text(staged.get('state'), '?')})"


def box_cells(row: Any, disk_text: Optional[str] = None) -> List[str]:
    """A box row of -l. disk_text: the DISK column as the config describes the disk (with its
    partition), where the row is local; a report from afar has the disk's path only."""
    row = _fields(row)
    if disk_text is None:
        disk_text = _text(row.get("disk")) + (" (missing)" if row.get("disk_missing") else "")
    incomplete, locked = row.get("incomplete"), row.get("locked")
    return [_text(row.get("name"), "?"), "yes" if row.get("in_config") else "no",
            _text(_fields(row.get("domain")).get("state"), "?"),
            "yes" if row.get("mounted") else "no",
            f"pid {_text(_fields(locked).get('pid'), '?')}" if locked else "no", disk_text,
            _text(row.get("base")),
            f"restore of {_text(_fields(incomplete).get('image'), '?')}" if incomplete else "no",
            staged_text(row.get("staged"))]


def entry_cells(entry: Any) -> List[str]:
    """An image or insert row of -L, --list-inserts (vmim.store.Entry.as_dict())."""
    entry = _fields(entry)
    base_of = entry.get("base_of")
    return [_text(entry.get("name"), "?"), _text(entry.get("format"), "?"),
            _size(entry.get("size") or 0), _text(entry.get("mtime"), "").replace("T", " ")[:16],
            _text(entry.get("directory"), "?"),
            ", ".join(_text(b, "?") for b in base_of) or "-"
            if isinstance(base_of, list) else "-"]


def render_list(what: str, rows: Sequence[Any], out: TextIO, *,
                hosts: Optional[Sequence[str]] = None,
                disk_texts: Optional[Sequence[str]] = None) -> None:
    """One list of the report as text: rows as --json has them (free: names). hosts: the
    fleet's, one a row, drawn as a HOST column in front (-f then is a table too)."""
    if what == "free" and hosts is None:
        out.writelines(safe(_text(n, "?")) + "\n" for n in rows)
        return
    if what == "free":
        headers, cells = ["NAME"], [[_text(n, "?")] for n in rows]
    elif what == "boxes":
        headers = BOX_HEADERS
        cells = [box_cells(r, disk_texts[i] if disk_texts is not None else None)
                 for i, r in enumerate(rows)]
    elif what == "locked":
        headers = LOCKED_HEADERS
        cells = [[_text(_fields(r).get(k), "?") for k in ("name", "pid", "command")]
                 for r in rows]
    else:
        headers, cells = ENTRY_HEADERS, [entry_cells(r) for r in rows]
    if hosts is not None:
        headers, cells = ["HOST", *headers], [[_text(h, "?"), *c] for h, c in zip(hosts, cells)]
    table(headers, cells, out)


def render_plans(plans: Sequence[Plan], code: int, out: TextIO) -> None:
    """--dry-run as text: each box's plan, then what the run would exit with."""
    for p in plans:
        out.write(p.text())
    out.write(dry_run_summary(code))


def print_lists(req: Request, cfg: Config, hv: Optional[Hypervisor], as_json: bool,
                doc: Dict[str, Any], out: TextIO) -> None:
    from vmim import listing

    if {"boxes", "free", "locked"} & set(req.lists):  # computed once for every list of boxes
        rows = listing.boxes(cfg, hv.domains() if hv is not None else None,
                             hv.definition if hv is not None and "boxes" in req.lists else None)
        for r in rows:
            if r.drift:
                log.warning("%s", drift_line(r.name, list(r.drift)))
    for what in req.lists:
        items: List[Any]
        if what == "boxes":
            items = [r.as_dict() for r in rows]
        elif what == "free":
            items = [r.name for r in rows if r.is_free]
        elif what == "locked":
            items = [{"name": r.name, **r.locked_by.as_dict()} for r in rows if r.locked_by]
        else:
            entries = listing.images(cfg) if what == "images" else listing.inserts(cfg)
            if not (cfg.image_dirs() if what == "images" else cfg.insert_dirs()):
                key = "vmimages" if what == "images" else "vminserts"
                log.warning("no %s store configured in %s: set %s in [vmim.local] (or in a "
                            "slot's section)", what[:-1], cfg.path, key)
            items = [e.as_dict() for e in entries]
        if as_json:
            doc[what] = items
        else:
            render_list(what, items, out,
                        disk_texts=[r.disk_text for r in rows] if what == "boxes" else None)
