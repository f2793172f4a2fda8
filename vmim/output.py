"""What a command prints: tables, names made printable, the lists (stdout only)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, TextIO

from vmim.config import Config
from vmim.definition import drift_line
from vmim.domain import Hypervisor
from vmim.plan import Request
from vmim.progress import human_size

log = logging.getLogger(__name__)

PROG = "vmimagemanager"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    for r in [list(headers), *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def entries_table(entries: Sequence[Any], out: TextIO) -> None:
    rows = [[safe(e.name), e.format, human_size(e.size), e.mtime_iso.replace("T", " ")[:16],
             safe(e.directory), ", ".join(e.base_of) or "-"] for e in entries]
    table(["NAME", "FORMAT", "SIZE", "MODIFIED (UTC)", "DIRECTORY", "BASE OF"], rows, out)


def undecodable_escaped(text: str) -> str:
    """Bytes that were not UTF-8 (in names from the command line or the disk) as \\x escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe(text: str) -> str:
    """A name as it can be printed: undecodable bytes as \\x escapes, newlines escaped."""
    return undecodable_escaped(text).replace("\n", "\\n")



def print_lists(req: Request, cfg: Config, hv: Optional[Hypervisor], as_json: bool,
                doc: Dict[str, Any],
                 out: TextIO) -> None:
    from vmim import listing

    if {"boxes", "free", "locked"} & set(req.lists):  # computed once for every list of boxes
        rows = listing.boxes(cfg, hv.domains() if hv is not None else None,
                             hv.definition if hv is not None and "boxes" in req.lists else None)
        for r in rows:
            if r.drift:
                log.warning("%s", drift_line(r.name, list(r.drift)))
    for what in req.lists:
        if what == "boxes":
            if as_json:
                doc["boxes"] = [r.as_dict() for r in rows]
            else:
                table(["NAME", "CONFIG", "STATE", "MOUNTED", "LOCKED", "DISK", "BASE",
                        "INCOMPLETE", "STAGED"],
                       [[safe(r.name), "yes" if r.in_config else "no", r.state,
                         "yes" if r.mounted else "no",
                         f"pid {r.locked_by.pid}" if r.locked_by else "no",
                         safe(r.disk_text), safe(r.base or "-"),
                         f"restore of {safe(str(r.incomplete.get('image')))}"
                         if r.incomplete else "no",
                         safe(r.staged.text()) if r.staged else "-"] for r in rows], out)
        elif what == "free":
            free = [r.name for r in rows if r.is_free]
            if as_json:
                doc["free"] = free
            else:
                out.writelines(safe(n) + "\n" for n in free)
        elif what == "locked":
            locked = [r for r in rows if r.locked_by]
            if as_json:
                doc["locked"] = [{"name": r.name, **r.locked_by.as_dict()}
                                 for r in locked if r.locked_by]
            else:
                table(["NAME", "PID", "COMMAND"],
                       [[safe(r.name), str(r.locked_by.pid), safe(r.locked_by.command)]
                        for r in locked if r.locked_by], out)
        else:
            entries = listing.images(cfg) if what == "images" else listing.inserts(cfg)
            if as_json:
                doc[what] = [e.as_dict() for e in entries]
            else:
                entries_table(entries, out)
