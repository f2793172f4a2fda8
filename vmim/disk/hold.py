"""Holding a slot's disk the way QEMU holds its images, so that a domain start fails while the
disk is mapped on the host, and a disk some QEMU holds is never mapped.

QEMU's image locking (block/file-posix.c, `locking=auto`) takes shared OFD byte-range locks on
the image file or block device: byte PERM_BASE+i for each permission i its user holds, byte
SHARED_BASE+i for each permission it does not share with others. A new opener first tests, with
F_OFD_GETLK, the bytes that say someone else does not share a permission it wants, or holds one
it does not share, and refuses: 'Failed to get "write" lock. Is another process using the
image?'. Every party takes read locks only, so taking them never blocks; the conflict is found
by the test, which QEMU makes after taking its own bytes (and so does hold_disk): of two
openers racing, at least one sees the other.

The hold is an open file description: the kernel drops its locks when the last descriptor of it
closes, so a run killed by SIGKILL holds nothing. A `--mount` that leaves the slot mounted hands
its descriptor to a holder process (keep_while_mounted) that the release stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import struct
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from vmim import procscan
from vmim.disk import namespaces
from vmim.errors import CleanupError, HostEnvironmentError, StateError

log = logging.getLogger(__name__)

#: Offsets of QEMU's lock bytes (block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
PERM_BASE = 100
SHARED_BASE = 200
#: QEMU's permission bits, in bit order (include/block/block-common.h, BLK_PERM_*). GRAPH_MOD
#: (bit 4) is gone since QEMU 6.2, but older ones may still lock its bytes.
PERMISSIONS = ("consistent read", "write", "write unchanged", "resize", "change children")
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE, GRAPH_MOD = (1 << i for i in range(5))
ALL = (1 << len(PERMISSIONS)) - 1

#: What the tool holds while it has a slot's disk mapped: it reads and writes it, and shares
#: reading and unchanged writes only, as a guest disk of QEMU does (no writer, no resizer).
HELD = CONSISTENT_READ | WRITE
SHARED = CONSISTENT_READ | WRITE_UNCHANGED

#: The name (argv[0]) of the process that keeps the hold of a slot left mounted by --mount.
HOLDER = "vmimagemanager-hold"

_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


@dataclass(frozen=True)
class Holder:
    """A process with the disk open and QEMU lock bytes on it."""

    pid: int
    description: str  # "pid N (qemu-system-x86_64, domain 'web1')"
    ours: bool  # a holder process of this tool (HOLDER)


@dataclass
class DiskHold:
    """An open file description of the disk carrying QEMU's lock bytes of HELD/SHARED."""

    path: str
    fd: int


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    """One byte's F_OFD_SETLK/F_OFD_GETLK; for GETLK, the type of the conflicting lock."""
    data = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0))
    return int(struct.unpack(_FLOCK, data)[0])


def _bits(mask: int) -> List[int]:
    return [i for i in range(len(PERMISSIONS)) if mask & (1 << i)]


def conflicts(fd: int, held: int = HELD, shared: int = SHARED) -> List[str]:
    """What another open file description's QEMU locks deny an opener that wants `held` and
    shares `shared` (QEMU's raw_check_lock_bytes): the permissions, as QEMU names them."""
    found = []
    for i in _bits(held):  # someone does not share what we want
        if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + i) != fcntl.F_UNLCK:
            found.append(f'"{PERMISSIONS[i]}"')
    for i in _bits(ALL & ~shared):  # someone holds what we do not share
        if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + i) != fcntl.F_UNLCK:
            found.append(f'shared "{PERMISSIONS[i]}"')
    return found


def _lock(fd: int, held: int, shared: int) -> None:
    for i in _bits(held):
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + i)
    for i in _bits(ALL & ~shared):
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + i)


def _open(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise StateError(f"{what} '{path}': cannot open it to hold it: {exc.strerror}") from None


def _identity(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _lock_ranges(pid: int, fd: str) -> List[Tuple[int, int]]:
    """The byte ranges of the OFD locks an open file carries (its fdinfo 'lock:' lines)."""
    ranges = []
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("lock:") and "OFDLCK" in line:
                    fields = line.split()
                    end = fields[-1]
                    ranges.append((int(fields[-2]), 2 ** 63 if end == "EOF" else int(end)))
    except (OSError, ValueError, IndexError):
        pass
    return ranges


def _uid(pid: int) -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _describe(pid: int) -> Tuple[str, bool]:
    argv = procscan.cmdline(pid)
    name = os.path.basename(argv[0]) if argv else procscan.comm(str(pid))
    if name == HOLDER and _uid(pid) == 0:  # a user's process of that name is not ours
        return f"pid {pid} ({HOLDER}, a slot left mounted by --mount)", True
    domain = namespaces.domain_of(pid)  # a QEMU: -name guest=NAME,...
    return f"pid {pid} ({name}{f', domain {domain!r}' if domain else ''})", False


def holders(path: str) -> List[Holder]:
    """Processes other than this one that have path open with QEMU lock bytes on it."""
    try:
        wanted = _identity(path)
    except OSError:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if _identity(f"/proc/{name}/fd/{fd}") != wanted:
                    continue
            except OSError:
                continue
            if any(lo <= SHARED_BASE + len(PERMISSIONS) and hi >= PERM_BASE
                   for lo, hi in _lock_ranges(int(name), fd)):
                text, ours = _describe(int(name))
                found.append(Holder(int(name), text, ours))
                break
    return found


def check_free(path: str, what: str, *, ignore: Callable[[Holder], bool] = lambda h: False,
               fd: Optional[int] = None) -> None:
    """Refuse (StateError, exit 4) a disk that another process holds as QEMU does: a QEMU
    running it, whatever libvirt says of its domain, or a storage daemon exporting it."""
    own = fd is None
    fd = _open(path, what) if fd is None else fd
    try:
        denied = conflicts(fd)
    finally:
        if own:
            os.close(fd)
    if not denied:
        return
    others = holders(path)
    if others and all(ignore(h) for h in others):
        return
    who = "; ".join(h.description for h in others if not ignore(h)) or \
        "a process that could not be found (in another mount or pid namespace?)"
    raise StateError(f"{what} '{path}' is in use by another process: {who} holds QEMU's "
                     f"lock on it (it denies "
                     f"{', '.join(denied)}): a running VM may be writing it, whatever libvirt "
                     "says; stop it first")


@contextlib.contextmanager
def hold_disk(path: str, what: str) -> Iterator[DiskHold]:
    """Hold path as a QEMU guest disk is held (see the module): a domain started meanwhile
    fails ('Failed to get "write" lock'). Refuses (exit 4) a disk another process holds, except
    this tool's own holder of a slot left mounted (the slot lock is held: it acts for us)."""
    fd = _open(path, what)
    try:
        _lock(fd, HELD, SHARED)  # first our bytes, then the test: as QEMU does
        check_free(path, what, ignore=lambda h: h.ours, fd=fd)
        log.debug("holding %s (QEMU lock bytes, fd %d)", path, fd)
        yield DiskHold(path, fd)
    finally:
        os.close(fd)  # the last descriptor of the description: the kernel drops its locks


# ----------------------------------------------------------------- the holder of a --mount


def our_holders(path: str) -> List[int]:
    """The holder processes (HOLDER, root) keeping path held for a slot left mounted."""
    return [h.pid for h in holders(path) if h.ours]


def keep(hold: DiskHold) -> int:
    """Hand the hold to a holder process that keeps it after this run ends (the slot stays
    mounted): `sleep infinity` named HOLDER, with the hold's descriptor and nothing else, in a
    session of its own, working directory /. Returns its pid."""
    sleep = shutil.which("sleep")
    if sleep is None:
        raise HostEnvironmentError("'sleep' (coreutils) is missing: it keeps the hold of a "
                                   "slot left mounted")
    env = {k: v for k, v in os.environ.items() if k != procscan.OWNER_ENV}
    proc = subprocess.Popen([HOLDER, "infinity"], executable=sleep, pass_fds=(hold.fd,),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd="/", env=env,
                            start_new_session=True)
    log.debug("pid %d (%s) holds %s while it stays mounted", proc.pid, HOLDER, hold.path)
    return proc.pid


def stop_holders(path: str, release_hint: str) -> List[str]:
    """Stop the holder processes of path (the slot was released): what was undone."""
    pids = our_holders(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = procscan.wait_gone(pids, 5.0)
    for pid in pids:  # our own child when this run started it: reap it
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    if left:
        raise CleanupError(f"the holder of {path} (pid {', '.join(map(str, left))}) did not "
                           f"stop; kill it, then run: {release_hint}")
    return [f"let go of {path} (stopped {HOLDER}, pid {pid})" for pid in pids]


def keep_while_mounted(holds: Sequence[DiskHold], mounted: bool) -> List[int]:
    """At the end of a run: when the slot stays mounted, hand each hold this run has to a
    holder process, unless one keeps it already. Returns the new holders' pids."""
    if not mounted:
        return []
    return [keep(h) for h in holds if not our_holders(h.path)]
