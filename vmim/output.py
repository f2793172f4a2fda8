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

log = logging.getLogger(__name__)

PROG = "vmimagemanager"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    for r in [list(headers), *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


#: what a terminal takes for a command, not text: C0 controls but newline and tab, DEL, C1
#: (0x9b is a CSI) — a guest's file name holding them reaches the admin's terminal in messages
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]
             if chr(c) not in "\n\t"}


def undecodable_escaped(text: str) -> str:
    """Bytes that were not UTF-8 (in names from the command line or the disk) as \\x escapes,
    and so are terminal controls other than newline and tab (ESC, BEL, CR, CSI...): whatever a
    message names (a guest's file, a worker's line), it prints as text."""
    return text.encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace").translate(_CONTROLS)


def safe(text: str) -> str:
    """A name as it can be printed: undecodable bytes as \\x escapes, newlines escaped."""
    return undecodable_escaped(text).replace("\n", "\\n")



# --------------------------------------------------------------------------- the one renderer
# Plans and lists are drawn from the report, the dicts of --json, here only: for a local run
# and for the fleet's (vmim.fleet.client), which adds a HOST column in front of each table.

BOX_HEADERS = ["NAME", "CONFIG", "STATE", "MOUNTED", "LOCKED", "DISK", "BASE", "INCOMPLETE",
               "STAGED"]
ENTRY_HEADERS = ["NAME", "FORMAT", "SIZE", "MODIFIED (UTC)", "DIRECTORY", "BASE OF"]
LOCKED_HEADERS = ["NAME", "PID", "COMMAND"]


def staged_text(staged: Any) -> str:
    """The STAGED column of a box row (vmim.standby.Staged.as_dict()): the image and when it
    was staged, or why it is not ready; else "-"."""
    if not isinstance(staged, Mapping):
        return "-"
    image = staged.get("image")
    if staged.get("skip") is None:  # ready
        return safe(f"{image} {(staged.get('finished') or '')[:16]}")
    return safe(f"{image} ({staged.get('state')})")


def box_cells(row: Mapping[str, Any], disk_text: Optional[str] = None) -> List[str]:
    """A box row of -l. disk_text: the DISK column as the config describes the disk (with its
    partition), where the row is local; a report from afar has the disk's path only."""
    if disk_text is None:
        disk_text = str(row.get("disk") or "-") + (" (missing)" if row.get("disk_missing") else "")
    incomplete = row.get("incomplete")
    locked = row.get("locked")
    return [safe(str(row.get("name"))), "yes" if row.get("in_config") else "no",
            str((row.get("domain") or {}).get("state", "?")), "yes" if row.get("mounted") else "no",
            f"pid {locked.get('pid')}" if locked else "no", safe(disk_text),
            safe(str(row.get("base") or "-")),
            f"restore of {safe(str(incomplete.get('image')))}" if incomplete else "no",
            staged_text(row.get("staged"))]


def entry_cells(entry: Mapping[str, Any]) -> List[str]:
    """An image or insert row of -L, --list-inserts (vmim.store.Entry.as_dict())."""
    return [safe(str(entry.get("name"))), str(entry.get("format")),
            human_size(int(entry.get("size") or 0)),
            str(entry.get("mtime") or "").replace("T", " ")[:16],
            safe(str(entry.get("directory"))), ", ".join(entry.get("base_of") or ()) or "-"]


def render_list(what: str, rows: Sequence[Any], out: TextIO, *,
                hosts: Optional[Sequence[str]] = None,
                disk_texts: Optional[Sequence[str]] = None) -> None:
    """One list of the report as text: rows as --json has them (free: names). hosts: the
    fleet's, one a row, drawn as a HOST column in front (-f then is a table too)."""
    if what == "free" and hosts is None:
        out.writelines(safe(str(n)) + "\n" for n in rows)
        return
    if what == "free":
        headers, cells = ["NAME"], [[safe(str(n))] for n in rows]
    elif what == "boxes":
        headers = BOX_HEADERS
        cells = [box_cells(r, disk_texts[i] if disk_texts is not None else None)
                 for i, r in enumerate(rows)]
    elif what == "locked":
        headers = LOCKED_HEADERS
        cells = [[safe(str(r.get("name"))), str(r.get("pid")), safe(str(r.get("command")))]
                 for r in rows]
    else:
        headers, cells = ENTRY_HEADERS, [entry_cells(r) for r in rows]
    if hosts is not None:
        headers, cells = ["HOST", *headers], [[h, *c] for h, c in zip(hosts, cells)]
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
