"""Mounted state from /proc/self/mountinfo (never /etc/mtab), mount and unmount."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from vmim import process
from vmim.errors import CleanupError, CommandError

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")

#: Pauses between unmount attempts while the target is busy (about 5 s in all).
UMOUNT_RETRY_DELAYS = (0.2, 0.3, 0.5, 1.0, 1.0, 2.0)


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    devno: int  # st_dev of the mounted filesystem (mountinfo's major:minor)
    root: str
    target: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> List[Mount]:
    out: List[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        out.append(Mount(
            mount_id=int(fields[0]),
            devno=os.makedev(int(major), int(minor)),
            root=unescape(fields[3]),
            target=unescape(fields[4]),
            fstype=unescape(fields[sep + 1]),
            source=unescape(fields[sep + 2]),
        ))
    return out


def all_mounts() -> List[Mount]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def mounts_at(mountpoint: str, mounts: Optional[Sequence[Mount]] = None) -> List[Mount]:
    """Mounts at mountpoint or below it, deepest first (the order to unmount them)."""
    mp = os.path.realpath(mountpoint)
    found = [m for m in (mounts if mounts is not None else all_mounts()) if _under(m.target, mp)]
    return sorted(found, key=lambda m: (m.target.count("/"), m.mount_id), reverse=True)


def mounted_at(mountpoint: str) -> Optional[Mount]:
    """The filesystem mounted exactly at mountpoint (the topmost one), if any."""
    mp = os.path.realpath(mountpoint)
    top = [m for m in all_mounts() if m.target == mp]
    return top[-1] if top else None


def mount(device: str, mountpoint: str, fstype: str, options: Sequence[str] = ()) -> None:
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    process.run([*argv, "--", device, mountpoint])


def holders(mountpoint: str) -> List[str]:
    """Processes whose cwd, root, executable or open files lie under mountpoint."""
    return [f"pid {pid} ({process.comm(pid)}: {', '.join(sorted(set(why)))})"
            for pid, why in process.path_users(mountpoint).items()]


def umount(target: str, *, release_hint: str) -> None:
    """Unmount target; while it is busy retry briefly, then raise CleanupError (exit 8)."""
    delays = list(UMOUNT_RETRY_DELAYS)
    while True:
        try:
            process.run(["umount", "--", target])
            return
        except CommandError as exc:
            gone = not any(m.target == os.path.realpath(target) for m in all_mounts())
            if gone:
                return
            if "busy" not in exc.stderr_tail or not delays:
                who = holders(target)
                held = f"; held by {', '.join(who)}" if who else ""
                raise CleanupError(
                    f"cannot unmount {target}: {exc.stderr_tail or exc}{held}. "
                    f"Stop what uses it, then run: {release_hint}"
                ) from None
            time.sleep(delays.pop(0))
