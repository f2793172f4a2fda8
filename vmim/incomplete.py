"""The mark of a slot whose restore began and did not finish.

A restore clears the slot's filesystem before it unpacks the image: from that moment until the
unpack is complete the slot holds a half-written system. The mark is written (and synced)
outside the guest, in the state directory, before anything in the slot is deleted, and removed
only when a restore completes. `-u` refuses to start a marked slot; the lists show it. It
survives SIGKILL, a crash of the host and a reboot (the state directory is not a tmpfs).
The state directory is a safedir: a user who could write it could remove a mark, or plant a
symlink for the mark to be written through.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional, Tuple
from urllib.parse import quote

from vmim import safedir
from vmim.config import Config, Slot
from vmim.errors import EXIT_COMMAND, HostEnvironmentError, full_disk

log = logging.getLogger(__name__)


def mark_name(box: str) -> str:
    return quote(box, safe="") + ".incomplete"


def mark_path(cfg: Config, box: str) -> str:
    return os.path.join(cfg.statedir, mark_name(box))


def state_dir(cfg: Config, *, create: bool = True) -> safedir.SafeDir:
    """The verified state directory (UnsafeDirectoryError, exit 7, when another user could
    write it); FileNotFoundError when it is missing and not to be created."""
    return safedir.open_dir(cfg.statedir, what="state directory", key="statedir",
                            mode=0o755 if create else None)


def read(cfg: Config, slot: Slot) -> Optional[dict]:
    """The slot's mark, or None. A mark made for another disk than the slot's (the config
    changed since) does not apply."""
    try:
        d = state_dir(cfg, create=False)
    except FileNotFoundError:
        return None  # never made: no mark
    except OSError as exc:
        return _unreadable(slot, exc)
    with d:
        try:
            raw = d.read(mark_name(slot.name))
            if raw is None:
                return None
            mark = json.loads(raw)
        except (OSError, ValueError, RecursionError, safedir.UnsafeDirectoryError) as exc:
            return _unreadable(slot, exc)
    if not isinstance(mark, dict) or "disk" not in mark:
        return _unreadable(slot, ValueError("not a restore mark"))  # assume the worst
    if mark["disk"] != slot.disk:
        return None
    return mark


def _unreadable(slot: Slot, exc: Exception) -> dict:
    """A mark that cannot be read: assume the worst, the slot is not to be started."""
    return {"image": "?", "started": "?", "disk": slot.disk, "error": str(exc)}


def describe(mark: dict) -> str:
    return f"the restore of '{mark.get('image', '?')}' begun {mark.get('started', '?')} did not finish"


def write(cfg: Config, slot: Slot, image: str) -> None:
    """Mark the slot before its filesystem is cleared; durable before it returns."""
    mark = {"box": slot.name, "disk": slot.disk, "image": image, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write(cfg, mark_name(slot.name), mark, f"write the restore mark of box '{slot.name}'",
           "nothing in the slot was touched (set statedir in [vmim.local])")


def _write(cfg: Config, name: str, doc: dict, what: str, outcome: str) -> None:
    """doc as JSON in the state directory under name, durable before it returns; a failure
    is exit 7 (6 when its disk is full), saying what could not be done and what that
    means."""
    try:
        with state_dir(cfg) as d:
            d.write_atomic(name, json.dumps(doc).encode())
    except OSError as exc:
        raise _unwritable(f"cannot {what} in {cfg.statedir}: {exc.strerror}; {outcome}",
                          exc) from None


def _unwritable(message: str, exc: OSError) -> HostEnvironmentError:
    """The state directory refused a write: exit 7, or 6 when its disk is full (as every
    full disk)."""
    error = HostEnvironmentError(message)
    if full_disk(exc):
        error.exit_code = EXIT_COMMAND
    return error


def remove(cfg: Config, slot: Slot) -> bool:
    """Drop the mark (and a re-make's record) once a restore completed; True when there was
    a mark."""
    try:
        with state_dir(cfg, create=False) as d:
            d.unlink(remake_name(slot))
            if not d.unlink(mark_name(slot.name)):
                return False
    except FileNotFoundError:
        return False
    log.debug("box %s: restore mark removed", slot.name)
    return True


# The re-make of a restore's clear (vmim.disk.remake) unmounts the filesystem and runs mkfs:
# killed in between, it leaves no filesystem, or one half made, and the parameters it read
# from the one that was there are gone with it. They are recorded here before the unmount,
# named by the disk (its path and partition: a record follows the disk, not the slot's name,
# across a standby swap), with the size of the device the filesystem spanned; the next
# restore of a slot on that disk runs them again before it mounts (vmim.steps.mount).

def remake_name(slot: Slot) -> str:
    import hashlib

    where = json.dumps([slot.disk, slot.partition])
    return "disk-" + hashlib.sha256(where.encode()).hexdigest()[:32] + ".remake"


def remake_path(cfg: Config, slot: Slot) -> str:
    return os.path.join(cfg.statedir, remake_name(slot))


def write_remake(cfg: Config, slot: Slot, record: dict, device_size: int) -> None:
    """Record the re-make about to run on the slot's filesystem (a device of device_size
    bytes); durable before it returns."""
    doc = {"disk": slot.disk, "partition": slot.partition, "box": slot.name,
           "device_size": device_size, "remake": record}
    _write(cfg, remake_name(slot), doc, f"record the re-make of box '{slot.name}'",
           "its filesystem was not re-made")


def read_remake(cfg: Config, slot: Slot) -> Optional[Tuple[Any, int]]:
    """The record of a re-make begun on the slot's disk and not known to have ended, and
    the size of the device it was for; None when there is none. ValueError when it cannot
    be read (vmim.disk.remake.from_record checks the record itself); UnsafeDirectoryError
    when another user could have written it."""
    try:
        d = state_dir(cfg, create=False)
    except (OSError, safedir.UnsafeDirectoryError):
        # none made, or none to believe: nothing is run (a restore's mark fails on the
        # state directory before the slot is touched: exit 7)
        return None
    try:
        with d:
            raw = d.read(remake_name(slot))
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except RecursionError:  # nested deeper than the decoder goes: not one write_remake wrote
        raise ValueError("not a re-make record") from None
    if not isinstance(doc, dict) or set(doc) != {"disk", "partition", "box", "device_size",
                                                 "remake"}:
        raise ValueError("not a re-make record")
    size = doc["device_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError("its device size is not a count of bytes")
    if doc["disk"] != slot.disk or doc["partition"] != slot.partition:
        return None  # another disk's (a hash collision, or a hand-made file)
    return doc["remake"], size


def remove_remake(cfg: Config, slot: Slot) -> None:
    """The re-make ended and its filesystem is mounted, never began, or the disk was made
    anew: its record goes. A state directory that cannot be opened is not an error here:
    no record in it is read either (read_remake)."""
    try:
        with state_dir(cfg, create=False) as d:
            d.unlink(remake_name(slot))
    except (OSError, safedir.UnsafeDirectoryError):
        pass
