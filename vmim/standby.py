"""The standby disk of a slot: the next image is staged into it while the guest runs, and the
next `-u` swaps it in: the downtime of one reboot (issue 24; docs/guide.md, "Re-image with one
reboot").

Two disks, one active. The active disk is the one libvirt's definition of the domain names
(when it names one of the two), else the one this host's record says, else HostDisk/root; the
other is the standby. `resolve()` gives every command a config in which the slot's disk is the
active one, and the standby is a slot of its own named BOX/standby (a name no slot can have:
HostName refuses '/'), mounted at <mount>.standby and locked under its own lock. A staging
never takes the slot's lock: it runs while the guest runs, and two stagings of one slot
serialize on the standby's lock. Everything of docs/safety.md holds for the standby as for
any slot: held as QEMU holds a disk while mapped, refused while any domain's definition lists
it, marked incomplete while its filesystem is cleared.

The record, <statedir>/<box>.standby.json (a safedir, written atomically):

    {"box", "active": path, "staged": {"image", "disk", "started", "finished", "image_id",
                                       "inserts"} | null}

"staged" is written, with "finished": null, before a staging touches the standby, and gets
its "finished" time once the staging completed. It applies only while its "disk" is the
standby. A staged image is swapped in only when it finished, no restore mark says the standby
is incomplete, and the image in the store is still the file that was staged.

The swap (vmim.steps.swap), with the domain shut off and the standby's lock held: libvirt's
definition is changed in its disk source only, then the record. Killed between the two, the
definition names the staged disk, which is complete, and it wins over the record at the next
run; killed before, nothing changed. At no instant does the definition name a disk that is not
complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

from vmim import incomplete, safedir
from vmim.config import Config, Slot
from vmim.errors import HostEnvironmentError

log = logging.getLogger(__name__)

#: BOX/standby: the standby disk of slot BOX as a slot of its own (its lock, mark, mount)
SUFFIX = "/standby"


def standby_name(box: str) -> str:
    return box + SUFFIX


def owner_of(name: str) -> Optional[str]:
    """BOX when name is BOX/standby, else None."""
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) and name != SUFFIX else None


def _record_name(box: str) -> str:
    return quote(box, safe="") + ".standby.json"


def read_record(cfg: Config, box: str) -> Dict[str, Any]:
    """The slot's record ({} when there is none); an unreadable one is {"error": ...}."""
    try:
        d = incomplete.state_dir(cfg, create=False)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        return {"error": str(exc)}
    with d:
        try:
            raw = d.read(_record_name(box))
            rec = json.loads(raw) if raw is not None else {}
        except (OSError, ValueError, RecursionError, safedir.UnsafeDirectoryError) as exc:
            return {"error": str(exc)}
    return rec if isinstance(rec, dict) else {"error": "not a JSON object"}


def _write_record(cfg: Config, box: str, rec: Dict[str, Any]) -> None:
    try:
        with incomplete.state_dir(cfg) as d:
            d.write_atomic(_record_name(box), json.dumps(rec, sort_keys=True).encode())
    except OSError as exc:
        raise HostEnvironmentError(f"cannot write the standby record of box '{box}' in "
                                   f"{cfg.statedir}: {exc.strerror} (set statedir in "
                                   "[vmim.local])") from None


def _same(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def active_disk(cfg: Config, slot: Slot, current_xml: Optional[str]) -> str:
    """Which of the slot's two disks the domain boots (see the module's docstring)."""
    from vmim.definition import disk_source

    pair = (slot.disk, slot.standby_disk)
    if current_xml:
        try:
            named = disk_source(current_xml)
        except (ValueError, SyntaxError):  # lxml's XMLSyntaxError is a SyntaxError
            named = None
        for disk in pair:
            if _same(named, disk):
                return str(disk)
    recorded = read_record(cfg, slot.name).get("active")
    for disk in pair:
        if isinstance(recorded, str) and _same(recorded, disk):
            return str(disk)
    return str(slot.disk)


def _with_disk(slot: Slot, disk: str, **changes: Any) -> Slot:
    if slot.hostdisk:
        return replace(slot, hostdisk=disk, **changes)
    return replace(slot, root=disk, **changes)


def resolve_slot(cfg: Config, slot: Slot, current_xml: Optional[str]) -> Tuple[Slot, Slot]:
    """The slot with its active disk, and its standby as a slot of its own."""
    active = active_disk(cfg, slot, current_xml)
    pair = [str(slot.disk), str(slot.standby_disk)]
    other = pair[1] if _same(active, pair[0]) else pair[0]
    return (_with_disk(slot, active, standby=other),
            _with_disk(slot, other, name=standby_name(slot.name), mount=slot.standby_mount,
                       standby=None, disksize=slot.disksize))


def resolve(cfg: Config, hv: Any, box: str) -> Config:
    """cfg with box's slot on its active disk and BOX/standby beside it; cfg itself when the
    slot has no standby. Idempotent: a resolved config resolves to itself."""
    slot = cfg.slot(box)
    if slot is None or owner_of(box) is not None or not slot.standby_disk:
        return cfg
    current = hv.definition(box) if hv is not None and hv.domain(box) is not None else None
    active, spare = resolve_slot(cfg, slot, current)
    slots = [active if s.name == box else s for s in cfg.slots if s.name != spare.name]
    return replace(cfg, slots=tuple(slots) + (spare,))


@dataclass(frozen=True)
class Staged:
    """What the standby holds, as the record says and the system confirms."""

    image: str
    started: str
    finished: Optional[str]
    skip: Optional[str] = None  # why it is not to be swapped in; None: ready
    state: str = "ready"  # ready, unfinished, stale, unreadable

    @property
    def ready(self) -> bool:
        return self.skip is None

    def as_dict(self) -> dict:
        return {"image": self.image, "started": self.started, "finished": self.finished,
                "state": self.state, "skip": self.skip}


def image_id(slot: Slot, image: str) -> Optional[Dict[str, int]]:
    """Which file image is in the slot's store now: a store of that name since makes another
    (stores put a new file in place)."""
    if not slot.vmimages:
        return None
    try:
        st = os.lstat(os.path.join(slot.vmimages, image))
    except OSError:
        return None
    return {"dev": st.st_dev, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


def staged(cfg: Config, slot: Slot, spare: Optional[Slot]) -> Optional[Staged]:
    """What is staged on the standby of the (resolved) slot, or None."""
    if spare is None:
        return None
    rec = read_record(cfg, slot.name)
    if "error" in rec:
        return Staged("?", "?", None, f"its record cannot be read: {rec['error']}",
                      "unreadable")
    st = rec.get("staged")
    if not isinstance(st, dict) or not _same(st.get("disk"), spare.disk):
        return None
    image, started = str(st.get("image", "?")), str(st.get("started", "?"))
    finished = st.get("finished") if isinstance(st.get("finished"), str) else None
    if finished is None or incomplete.read(cfg, spare) is not None:
        return Staged(image, started, None, f"the staging of image '{image}' begun {started} "
                      "did not finish", "unfinished")
    if st.get("image_id") != image_id(slot, image):
        return Staged(image, started, finished, f"image '{image}' was stored again (or "
                      f"removed) since it was staged {finished}: stage it again", "stale")
    return Staged(image, started, finished)


def begin(cfg: Config, slot: Slot, spare: Slot, image: Optional[str],
          inserts: List[str]) -> None:
    """Before a staging touches the standby: what it stages, not finished. image None: inserts
    into what is staged already (the record keeps its image, the file it was, its inserts)."""
    rec = read_record(cfg, slot.name)
    rec.pop("error", None)
    old: Dict[str, Any] = rec["staged"] if isinstance(rec.get("staged"), dict) else {}
    if image is None:
        image, ident = str(old.get("image", "?")), old.get("image_id")
        inserts = [*old.get("inserts", []), *inserts]
    else:
        ident = image_id(slot, image)
    rec.update(box=slot.name, active=slot.disk, staged={
        "image": image, "disk": spare.disk, "inserts": inserts, "finished": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_id": ident})
    _write_record(cfg, slot.name, rec)


def finish(cfg: Config, slot: Slot) -> None:
    """The staging completed: the staged image may be swapped in."""
    rec = read_record(cfg, slot.name)
    st = rec.get("staged")
    if isinstance(st, dict):
        st["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_record(cfg, slot.name, rec)


def swapped(cfg: Config, box: str, active: str) -> None:
    """After the definition names the staged disk: the record follows."""
    _write_record(cfg, box, {"box": box, "active": active, "staged": None})
