"""The mark of a slot whose restore began and did not finish.

A restore clears the slot's filesystem before it unpacks the image: from that moment until the
unpack is complete the slot holds a half-written system. The mark is written (and synced)
outside the guest, in the state directory, before anything in the slot is deleted, and removed
only when a restore completes. `-u` refuses to start a marked slot; the lists show it. It
survives SIGKILL, a crash of the host and a reboot (the state directory is not a tmpfs).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional
from urllib.parse import quote

from vmim.config import Config, Slot
from vmim.errors import HostEnvironmentError

log = logging.getLogger(__name__)


def mark_path(cfg: Config, box: str) -> str:
    return os.path.join(cfg.statedir, quote(box, safe="") + ".incomplete")


def read(cfg: Config, slot: Slot) -> Optional[dict]:
    """The slot's mark, or None. A mark made for another disk than the slot's (the config
    changed since) does not apply."""
    try:
        with open(mark_path(cfg, slot.name), encoding="utf-8") as fh:
            mark = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # unreadable: assume the worst, the slot is not to be started
        return {"image": "?", "started": "?", "disk": slot.disk, "error": str(exc)}
    if not isinstance(mark, dict) or mark.get("disk") != slot.disk:
        return None
    return mark


def describe(mark: dict) -> str:
    return f"the restore of '{mark.get('image', '?')}' begun {mark.get('started', '?')} did not finish"


def write(cfg: Config, slot: Slot, image: str) -> None:
    """Mark the slot before its filesystem is cleared; durable before it returns."""
    path = mark_path(cfg, slot.name)
    mark = {"box": slot.name, "disk": slot.disk, "image": image, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(cfg.statedir, mode=0o755, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(mark, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(cfg.statedir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HostEnvironmentError(
            f"cannot write the restore mark of box '{slot.name}' in {cfg.statedir}: "
            f"{exc.strerror}; nothing in the slot was touched (set statedir in [vmim.local])"
        ) from None


def remove(cfg: Config, slot: Slot) -> bool:
    """Drop the mark once a restore completed; True when there was one."""
    try:
        os.unlink(mark_path(cfg, slot.name))
    except FileNotFoundError:
        return False
    log.debug("box %s: restore mark removed", slot.name)
    return True
