"""qcow2 images as raw files: a `qemu-storage-daemon` FUSE export, so that the loop and partition
code serves qcow2 slots on hosts without nbd.

The daemon opens the qcow2 image (its backing chain read-only, as QEMU always does) and shows it
as a raw file on a FUSE mount over an empty regular file in EXPORT_DIR. A loop device on that file
(at a partition's offset) mounts; writes land in the qcow2 image, never in its base.

Everything is found again from live state, so a run killed by SIGKILL leaves nothing the next
one cannot undo: loop devices backed by the export file (losetup), the FUSE mount on it
(/proc/self/mountinfo), and the daemon (its pidfile, and any process whose command line exports
to that file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, List

from vmim import process, procscan
from vmim.disk import loop, mounts
from vmim.errors import CleanupError, CommandError, HostEnvironmentError, StateError

log = logging.getLogger(__name__)

DAEMON = "qemu-storage-daemon"
#: Export files and pidfiles live here, outside every guest and store.
EXPORT_DIR = "/run/vmim/exports"
#: How long the daemon gets to write back and exit after SIGTERM before it is killed.
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Export:
    disk: str  # the qcow2 image (real path)
    path: str  # the raw file the daemon shows it as
    pidfile: str


def export_for(disk: str) -> Export:
    """Where the export of disk lives: derived from the disk's real path, so a later run finds it."""
    real = os.path.realpath(disk)
    tag = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = os.path.join(os.path.realpath(EXPORT_DIR), f"{os.path.basename(real)}-{tag}")
    return Export(real, f"{stem}.raw", f"{stem}.pid")


def _opt(value: str) -> str:
    """A value inside a QEMU option string: commas are doubled."""
    return value.replace(",", ",,")


def daemon_argv(exp: Export) -> List[str]:
    return [DAEMON,
            "--blockdev", f"driver=file,filename={_opt(exp.disk)},node-name=f",
            "--blockdev", "driver=qcow2,file=f,node-name=q",
            "--export", f"type=fuse,id=e,node-name=q,mountpoint={_opt(exp.path)},writable=on",
            "--daemonize", "--pidfile", exp.pidfile]


def start(exp: Export) -> None:
    """Start the daemon exporting exp.disk at exp.path; it runs on after this returns."""
    process.require_tool(DAEMON, "install Debian's qemu-system-common: file-level actions on "
                                 "qcow2 slots go through its FUSE export")
    if not os.path.exists("/dev/fuse"):
        raise HostEnvironmentError("file-level actions on a qcow2 slot need FUSE (/dev/fuse "
                                   "is missing: 'modprobe fuse')")
    os.makedirs(os.path.dirname(exp.path), mode=0o700, exist_ok=True)
    with open(exp.path, "a"):  # the mount point: an existing regular file
        pass
    try:
        process.run(daemon_argv(exp), daemon=True)  # not reaped as a killed run's leftover
    except CommandError as exc:
        _remove_files(exp)
        if "lock" in exc.stderr_tail:
            raise StateError(f"qcow2 disk '{exp.disk}' is in use by another process (a running "
                             f"VM?): {exc.stderr_tail}") from None
        raise
    log.debug("exported %s at %s (pid %s)", exp.disk, exp.path, _pidfile_pid(exp))


def loops_on(exp: Export) -> List[loop.Loop]:
    """Loop devices backed by the export file (by name: a stat of a dead export fails)."""
    return [lo for lo in loop.list_loops() if lo.back_file == exp.path]


def fuse_mounts(exp: Export) -> List[mounts.Mount]:
    return [m for m in mounts.all_mounts()
            if m.target == exp.path and m.fstype.split(".")[0] == "fuse"]


def _exports(pid: int, exp: Export) -> bool:
    """Whether pid is a live qemu-storage-daemon exporting to exp.path (a zombie has no
    command line)."""
    argv = procscan.cmdline(pid)
    wanted = f"mountpoint={_opt(exp.path)},"
    return bool(argv) and os.path.basename(argv[0]) == DAEMON and any(wanted in a for a in argv)


def _pidfile_pid(exp: Export) -> int:
    try:
        with open(exp.pidfile) as fh:
            text = fh.read().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def daemon_pids(exp: Export) -> List[int]:
    """The daemons exporting to exp.path: the pidfile's (checked against its command line) and
    any other (one whose pidfile is lost)."""
    found = set()
    pid = _pidfile_pid(exp)
    if pid and _exports(pid, exp):
        found.add(pid)
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in found and _exports(int(name), exp):
            found.add(int(name))
    return sorted(found)


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(exp: Export, release_hint: str) -> List[str]:
    """Undo the export of exp.disk as found in live state: detach the loop devices on it, stop
    the daemon (SIGTERM: it writes back and unmounts), unmount a FUSE mount a killed daemon
    left, remove the files. Returns what was undone; CleanupError when something stays."""
    undone: List[str] = []
    for lo in loops_on(exp):
        loop.detach(lo.device)
        undone.append(f"detached {lo.device}")
    # A detached loop device lets go of the file when its last opener closes it.
    if not _wait(lambda: not loops_on(exp), 5.0):
        left = ", ".join(lo.device for lo in loops_on(exp))
        raise CleanupError(f"loop device(s) {left} on the export of {exp.disk} did not let go "
                           f"of it; stop what uses them, then run: {release_hint}")
    pids = daemon_pids(exp)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if pids and not _wait(lambda: not any(_exports(p, exp) for p in pids), STOP_TIMEOUT):
        log.warning("%s exporting %s did not stop on SIGTERM within %.0f s; killing it",
                    DAEMON, exp.disk, STOP_TIMEOUT)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait(lambda: not any(_exports(p, exp) for p in pids), 5.0)
    if pids:
        undone.append(f"stopped {DAEMON} (pid {', '.join(map(str, pids))})")
    for m in fuse_mounts(exp):  # the daemon was killed before it could unmount
        mounts.umount(m.target, release_hint=release_hint)
        undone.append(f"unmounted the dead export {m.target}")
    left_pids = [p for p in pids if _exports(p, exp)]
    if left_pids:
        raise CleanupError(f"{DAEMON} (pid {', '.join(map(str, left_pids))}) exporting "
                           f"{exp.disk} did not stop; kill it, then run: {release_hint}")
    _remove_files(exp)
    return undone


def _remove_files(exp: Export) -> None:
    for path in (exp.path, exp.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
