"""Mounted state from /proc/self/mountinfo (never /etc/mtab), mount and unmount."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

from vmim import process, procscan, signals
from vmim.errors import CleanupError, CommandError
from vmim.paths import is_under

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
    tags: Tuple[str, ...] = ()  # mountinfo's optional fields: shared:N, master:N, ...
    options: Tuple[str, ...] = ()  # the per-mount options: rw, nodev, nosuid, ...
    #: the filesystem's own options (mountinfo's last field): errors=..., resuid=N, ...
    super_options: Tuple[str, ...] = ()

    @property
    def shared(self) -> bool:
        """Whether mounts and unmounts below it propagate to its copies (peers and slaves)."""
        return any(t.startswith("shared:") for t in self.tags)


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
            tags=tuple(fields[6:sep]),
            options=tuple(fields[5].split(",")),
            super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
        ))
    return out


def all_mounts() -> List[Mount]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


def mounts_at(mountpoint: str, mounts: Optional[Sequence[Mount]] = None) -> List[Mount]:
    """Mounts at mountpoint or below it, deepest first (the order to unmount them)."""
    mp = os.path.realpath(mountpoint)
    found = [m for m in (mounts if mounts is not None else all_mounts()) if is_under(m.target, mp)]
    return sorted(found, key=lambda m: (m.target.count("/"), m.mount_id), reverse=True)


def mounted_at(mountpoint: str) -> Optional[Mount]:
    """The filesystem mounted exactly at mountpoint (the topmost one), if any."""
    mp = os.path.realpath(mountpoint)
    top = [m for m in all_mounts() if m.target == mp]
    return top[-1] if top else None


def mount_base(mountpoint: str, prefix: str) -> str:
    """The directory to make a shared mount for a slot mounted at mountpoint: the mount prefix
    when the slot lies below it, else the mount point's parent."""
    mp, top = os.path.normpath(mountpoint), os.path.normpath(prefix)
    if mp != top and is_under(mp, top):
        return top
    return os.path.dirname(mp)


@contextlib.contextmanager
def _locked_dir(path: str) -> Iterator[None]:
    """Hold an exclusive flock on a directory (two slots' first mounts run at once with --jobs)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_shared(base: str) -> str:
    """Make base a mount point with shared propagation, so that the copies of the mounts below it
    that a new mount namespace takes (every QEMU libvirt starts) are slaves that receive our
    unmounts instead of pinning the filesystem. Binds base onto itself when it is not a mount
    point yet, then `mount --make-rshared`; does nothing when it already is one (the state comes
    from mountinfo, so a second run adds nothing). Returns what it did ("" for nothing)."""
    # root's only when made here: a mounted guest's files are no other local user's to read or
    # write (a guest's uid N is the host's uid N)
    os.makedirs(base, mode=0o700, exist_ok=True)
    base = os.path.realpath(base)
    if base == "/":
        log.warning("mount base is /: not changing the propagation of the whole host; make / "
                    "shared ('mount --make-rshared /') so QEMU does not pin slot mounts")
        return ""
    with _locked_dir(base):
        mounted = all_mounts()
        top = [m for m in mounted if m.target == base]
        done = []
        if not top:
            below = [m.target for m in mounted if is_under(m.target, base) and m.target != base]
            if below:  # a bind now would hide them (and pin them under it)
                log.warning("cannot make %s a shared mount while %s %s mounted below it; release "
                            "them first", base, ", ".join(below), "is" if len(below) == 1 else "are")
                return ""
            process.run(["mount", "--bind", "--", base, base])
            done.append(f"bound {base} onto itself")
            top = [m for m in all_mounts() if m.target == base]
        if not top or not top[-1].shared:
            process.run(["mount", "--make-rshared", "--", base])
            done.append(f"made {base} a shared mount")
    if done:
        log.info("mount base: %s", "; ".join(done))
    return "; ".join(done)


def mount(device: str, mountpoint: str, fstype: str, options: Sequence[str] = ()) -> None:
    """Mount device at mountpoint. A mount(8) stopped by a signal (or failing) after the kernel
    mounted the filesystem leaves it mounted: it is unmounted again before the error goes on,
    as the caller unmaps the device next (which then failed 'in use', exit 8, and left the
    slot mounted: integration/test_signals.py)."""
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    try:
        process.run([*argv, "--", device, mountpoint])
    except BaseException:
        with signals.kept():
            here = mounted_at(mountpoint)
            if here is not None and here.devno == os.stat(device).st_rdev:
                log.debug("mounted before mount(8) was stopped: unmounting %s", mountpoint)
                try:
                    process.run(["umount", "--", mountpoint])
                except CommandError as exc:  # the error that stopped the mount goes on
                    log.error("cannot unmount %s again: %s", mountpoint, exc)
        raise


def restrict(m: Mount, options: Sequence[str]) -> bool:
    """Give mount m the per-mount options it lacks (nodev, nosuid) by a remount; whether it
    had to."""
    missing = [o for o in options if o not in m.options]
    if missing:
        process.run(["mount", "-o", ",".join(["remount", *missing]), "--", m.target])
    return bool(missing)


def holders(mountpoint: str) -> List[str]:
    """Processes whose cwd, root, executable or open files lie under mountpoint."""
    return [f"pid {pid} ({procscan.comm(pid)}: {', '.join(sorted(set(why)))})"
            for pid, why in procscan.path_users(mountpoint).items()]


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
