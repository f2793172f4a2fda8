"""Loop devices: attach a file (or a byte range of it), find and detach them from live state."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import List, Optional

from vmim import process
from vmim.disk import namespaces
from vmim.errors import CleanupError, CommandError, HostEnvironmentError

log = logging.getLogger(__name__)

COLUMNS = "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,OFFSET,SIZELIMIT"

#: Pauses while a detached loop device lets go (a short-lived opener delays it: about 1 s).
DETACH_WAIT_DELAYS = (0.05, 0.1, 0.2, 0.3, 0.4)


@dataclass(frozen=True)
class Loop:
    device: str
    back_file: str
    back_ino: Optional[int]
    back_dev: Optional[int]
    offset: int
    sizelimit: int


def parse_list(text: str) -> List[Loop]:
    """Parse `losetup --json --list -O COLUMNS`."""
    if not text.strip():
        return []
    out: List[Loop] = []
    for d in json.loads(text).get("loopdevices", []):
        back_dev = None
        mm = (d.get("back-maj:min") or "").strip()
        if ":" in mm:
            major, minor = mm.split(":")
            back_dev = os.makedev(int(major), int(minor))
        ino = d.get("back-ino")
        out.append(Loop(
            device=d["name"],
            back_file=(d.get("back-file") or "").removesuffix(" (deleted)"),
            back_ino=int(ino) if ino not in (None, "") else None,
            back_dev=back_dev,
            offset=int(d.get("offset") or 0),
            sizelimit=int(d.get("sizelimit") or 0),
        ))
    return out


def list_loops() -> List[Loop]:
    res = process.run(["losetup", "--json", "--list", "-O", COLUMNS], capture=True)
    return parse_list(res.stdout)


def loops_backed_by(path: str) -> List[Loop]:
    """Loop devices whose backing file is path (matched by inode, or by name for devices)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    real = os.path.realpath(path)
    found = []
    for lo in list_loops():
        if stat.S_ISREG(st.st_mode) and lo.back_ino == st.st_ino and lo.back_dev == st.st_dev:
            found.append(lo)
        elif lo.back_file and os.path.realpath(lo.back_file) == real:
            found.append(lo)
    return found


def attach(path: str, *, offset: int = 0, size: int = 0) -> str:
    """Attach path (from offset, size bytes; 0 = to the end) to a free loop device."""
    argv = ["losetup", "--find", "--show"]
    if offset:
        argv += ["--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    try:
        res = process.run([*argv, "--", path], capture=True)
    except CommandError as exc:
        tail = exc.stderr_tail
        if "unused loop device" in tail or "free loop device" in tail or "No such device" in tail:
            raise HostEnvironmentError(
                f"no free loop device to attach {path} ({exc.stderr_tail}); "
                "see 'losetup --list' for the ones in use"
            ) from None
        raise
    device = res.stdout.strip()
    log.debug("attached %s to %s", path, device)
    return device


def claimed(device: str) -> bool:
    """Whether something holds device exclusively: a mounted filesystem, in any mount namespace
    (a QEMU's copy of the host's mounts too), or a device-mapper table."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def attached_file(device: str) -> str:
    """The file backing a loop device now ('' when it is free)."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def detach(device: str) -> None:
    """Free a loop device, and make sure it is gone: `losetup --detach` of a device in use only
    marks it to be freed when its last user lets go (autoclear) and succeeds all the same."""
    delays = list(DETACH_WAIT_DELAYS)
    while claimed(device):  # a mount namespace that just ended lets go of its mounts a moment
        if not delays:      # later (the kernel's delayed mntput): a busy host shows it
            held = namespaces.mounts_elsewhere([device])
            where = (f": {namespaces.describe(held)}" if held else
                     " (mounted, maybe in another mount namespace)")
            raise CleanupError(f"cannot detach {device} ({attached_file(device) or 'no file'}): "
                               f"it is in use{where}")
        time.sleep(delays.pop(0))
    backing = attached_file(device)
    process.run(["losetup", "--detach", device])
    delays = list(DETACH_WAIT_DELAYS)
    while backing and attached_file(device) == backing:  # (not reused for another file since)
        if not delays:
            raise CleanupError(f"{device} is still attached to {backing} after "
                               "'losetup --detach': something has it open; it is freed when "
                               "that lets go ('losetup --list' shows it with AUTOCLEAR 1)")
        time.sleep(delays.pop(0))
    log.debug("detached %s", device)
