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
from typing import Optional
from urllib.parse import quote

from vmim import safedir
from vmim.config import Config, Slot
from vmim.errors import HostEnvironmentError

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
        except (OSError, ValueError, safedir.UnsafeDirectoryError) as exc:
            return _unreadable(slot, exc)
    if not isinstance(mark, dict) or mark.get("disk") != slot.disk:
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
    try:
        with state_dir(cfg) as d:
            d.write_atomic(mark_name(slot.name), json.dumps(mark).encode())
    except OSError as exc:
        raise HostEnvironmentError(
            f"cannot write the restore mark of box '{slot.name}' in {cfg.statedir}: "
            f"{exc.strerror}; nothing in the slot was touched (set statedir in [vmim.local])"
        ) from None


def remove(cfg: Config, slot: Slot) -> bool:
    """Drop the mark once a restore completed; True when there was one."""
    try:
        with state_dir(cfg, create=False) as d:
            if not d.unlink(mark_name(slot.name)):
                return False
    except FileNotFoundError:
        return False
    log.debug("box %s: restore mark removed", slot.name)
    return True
