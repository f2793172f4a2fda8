"""Per-slot locks: an flock on <lockdir>/<box>.lock, released by the kernel when the holder dies.

The lock directory is a safedir: verified from / down (no other user can write it or replace
a part of its path) and its lock files are opened without following symlinks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import quote

from vmim import safedir, signals
from vmim.errors import HostEnvironmentError, LockBusyError

log = logging.getLogger(__name__)

POLL = 0.2
#: seconds a lock whose holder is gone is waited for: the commands of a run killed as it
#: forked them keep its lock until they die with it (setpriv --pdeathsig: at once)
LOCK_GRACE = 3.0


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str

    def as_dict(self) -> dict:
        return {"pid": self.pid, "command": self.command}


def lock_name(box: str) -> str:
    return quote(box, safe="") + ".lock"


def lock_path(lockdir: str, box: str) -> str:
    return os.path.join(lockdir, lock_name(box))


def lock_dir(lockdir: str, *, create: bool = True) -> safedir.SafeDir:
    """The verified lock directory (UnsafeDirectoryError, exit 7, when another user could write
    it); FileNotFoundError when it is missing and not to be created."""
    return safedir.open_dir(lockdir, what="lock directory", key="lockdir",
                            mode=0o755 if create else None)


def _open(lockdir: str, box: str) -> int:
    try:
        with lock_dir(lockdir) as d:
            return d.open(lock_name(box), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise HostEnvironmentError(
            f"cannot open the lock file of box '{box}' in {lockdir}: {exc.strerror} "
            "(run as root, or set lockdir in [vmim.local])"
        ) from None


@contextlib.contextmanager
def slot_lock(lockdir: str, box: str, wait: float = 0) -> Iterator[None]:
    """Hold box's lock; wait up to `wait` seconds for another holder, then LockBusyError (exit 5)."""
    fd = _open(lockdir, box)
    grace: Optional[float] = None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                held = holder(lockdir, box)
                if not _alive(held) and grace is None:
                    # the holder is gone: what keeps its lock is a command it was starting,
                    # which dies with it (vmim.process) in a moment
                    grace = time.monotonic() + LOCK_GRACE
                if not _alive(held) and time.monotonic() < (grace or 0):
                    signals.sleep(0.01)
                    continue
                who = f"pid {held.pid} ({held.command})" if held else "another command"
                raise LockBusyError(
                    f"box '{box}' is locked by {who}; try again later or wait with --lock-wait S"
                )
            signals.sleep(POLL)
        record = f"{os.getpid()}\n".encode() + b" ".join(map(os.fsencode, sys.argv)) + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        log.debug("locked box %s (%s)", box, lock_path(lockdir, box))
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _alive(held: Optional[Holder]) -> bool:
    """Whether the process that took a lock still runs (None: nobody holds it now)."""
    if held is None:
        return False
    try:
        os.kill(held.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(lockdir: str, box: str) -> Optional[Holder]:
    """Who holds box's lock now, or None when it is free.

    Read from /proc/locks, without taking the lock even briefly: a probe that locked would
    make a concurrent command's non-blocking attempt fail as if the slot were busy.
    """
    try:
        d = lock_dir(lockdir, create=False)
    except OSError:  # missing, not a directory, not ours to read: nobody holds a lock there
        return None
    with d:
        try:
            st = d.lstat(lock_name(box))
            with open("/proc/locks") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return None
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        for line in lines:
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                continue  # a waiter, or another kind of lock
            try:
                major, minor, ino = fields[5].split(":")
                if (int(major, 16), int(minor, 16), int(ino)) != want:
                    continue
                pid = int(fields[4])
            except ValueError:
                continue
            return Holder(pid, _command_of(pid, _record(d, box)))
    return None


def _record(d: safedir.SafeDir, box: str) -> bytes:
    """What the holder wrote in the lock file (its pid and command line)."""
    try:
        fd = d.open(lock_name(box), os.O_RDONLY)
    except (OSError, safedir.UnsafeDirectoryError):
        return b""
    try:
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def _command_of(pid: int, record: bytes) -> str:
    """The holder's command line, as it recorded it in the lock file (else from /proc)."""
    pid_text, _, command = record.decode("utf-8", "replace").partition("\n")
    if pid_text.strip() == str(pid):
        return command.strip()
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"
