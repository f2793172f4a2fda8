"""The host's record of the staging directories a run makes at a guest's root.

A run unpacks archives into a fresh `.vmim-*` directory in the guest; a run killed by SIGKILL
leaves it there, and the next run removes it. What tells that leftover from guest data must be
something the guest cannot forge: not a name, not an xattr (the guest's root sets any
`user.*` it likes). So each staging directory is recorded on the host, in the state directory
(a safedir), before anything is put in it:

    <statedir>/staging/<box>/<entry name>.json
        {"name", "disk", "ino", "generation", "dev", "owner", "made"}

`owner` is the run (procscan.owner_tag(): pid and start time); `disk` is the slot's disk, the
filesystem the entry lives on (its device number changes with every mapping); `ino` and
`generation` (FS_IOC_GETVERSION, where the filesystem has it: ext4, xfs, btrfs) tell that
entry from a guest one made later under the same name. The record is removed once the entry is
gone. A leftover is removed only when a record of a run that has ended matches it: name, inode
and generation. A record whose entry is gone or is another one is dropped, nothing removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional
from urllib.parse import quote

from vmim import procscan, safedir
from vmim.config import Config, Slot

log = logging.getLogger(__name__)

FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
SUFFIX = ".json"


def generation(fd: int) -> Optional[int]:
    """The inode's generation number (fresh for every inode a filesystem makes), or None."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf, True)
    except OSError:
        return None
    return int.from_bytes(buf[:4], "little")


def _identity(root_fd: int, name: str) -> Optional[Dict[str, Any]]:
    """ino, generation and dev of directory name at the guest root; None when it is not a
    directory (or not there)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=root_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        st = os.fstat(fd)
        return {"ino": st.st_ino, "generation": generation(fd), "dev": st.st_dev}
    finally:
        os.close(fd)


def _remove_if_empty(root_fd: int, root: str, name: str) -> None:
    """rmdir: at worst an empty directory of the guest's goes, never data."""
    try:
        os.rmdir(name, dir_fd=root_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
        return
    log.info("removed %s: an empty staging directory an interrupted run was making",
             os.path.join(root, name))


@dataclass(frozen=True)
class WorkLog:
    """The records of one slot's staging directories."""

    statedir: str
    box: str
    disk: str

    @classmethod
    def of(cls, cfg: Config, slot: Slot) -> WorkLog:
        return cls(cfg.statedir, slot.name, slot.disk or "")

    def _dir(self, *, create: bool) -> safedir.SafeDir:
        top = safedir.open_dir(self.statedir, what="state directory", key="statedir",
                               mode=0o755 if create else None)
        with top:
            with top.subdir("staging", 0o755, create=create) as staging:
                return staging.subdir(quote(self.box, safe=""), 0o755, create=create)

    def begin(self, name: str) -> None:
        """Record that this run is about to make entry name at the guest root; durable on
        return. Until made() completes the record, it proves only that an *empty* directory
        of that name may be ours."""
        self._write(name, {})

    def made(self, root: str, name: str) -> None:
        """Complete the record of entry name, just made at the guest root by this run."""
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ident = _identity(root_fd, name)
        finally:
            os.close(root_fd)
        if ident is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", os.path.join(root, name))
        self._write(name, ident)

    def rename(self, root: str, old: str, new: str) -> None:
        """Rename the recorded entry old at the guest root to new (not there): new's record,
        of the same inode, is written before the rename and old's dropped after, so a run
        killed in between leaves a record that matches what is there."""
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ident = _identity(root_fd, old)
            if ident is None:
                raise FileNotFoundError(errno.ENOENT, "no such directory", os.path.join(root, old))
            self._write(new, ident)
            os.rename(old, new, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        finally:
            os.close(root_fd)
        self.forget(old)

    def _write(self, name: str, ident: Dict[str, Any]) -> None:
        entry = {"name": name, "disk": self.disk, **ident, "owner": procscan.owner_tag(),
                 "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self._dir(create=True) as d:
            d.write_atomic(name + SUFFIX, json.dumps(entry).encode())

    def forget(self, name: str) -> None:
        try:
            with self._dir(create=False) as d:
                d.unlink(name + SUFFIX)
        except FileNotFoundError:
            pass

    def _records(self, d: safedir.SafeDir) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for n in d.listdir():
            if n.endswith(".tmp") and not procscan.pid_alive(n.rsplit(".", 2)[-2]):
                d.unlink(n)  # a record a killed run was writing
                continue
            if not n.endswith(SUFFIX):
                continue
            try:
                entry = json.loads(d.read(n) or b"")
            except (OSError, ValueError, RecursionError, safedir.UnsafeDirectoryError):
                log.warning("box %s: unreadable staging record %s: ignored", self.box,
                            os.path.join(d.path, n))
                continue
            if isinstance(entry, dict) and entry.get("name") == n[:-len(SUFFIX)]:
                out[n[:-len(SUFFIX)]] = entry
        return out

    def any(self) -> bool:
        """Whether any staging directory is recorded (changes nothing, unlike stale())."""
        try:
            with self._dir(create=False) as d:
                return bool(d.listdir())
        except FileNotFoundError:
            return False
        except (OSError, safedir.UnsafeDirectoryError):  # unusable: stale() says so; not none
            return True

    def stale(self, root: str) -> List[str]:
        """Names at the guest root that are staging directories of runs that have ended, as
        recorded; records that no longer match anything there are dropped."""
        try:
            d = self._dir(create=False)
        except FileNotFoundError:
            return []
        except OSError as exc:  # unusable (not a directory...): nothing is known to be ours
            log.warning("box %s: cannot read the records of staging directories in %s (%s): "
                        "what an interrupted run left in the guest stays", self.box,
                        self.statedir, exc.strerror)
            return []
        found: List[str] = []
        with d:
            records = self._records(d)
            if not records:
                return []
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name, entry in sorted(records.items()):
                    if not procscan.owner_gone(str(entry.get("owner", ""))):
                        continue  # a run still at work (this one, say)
                    if entry.get("disk") != self.disk:
                        d.unlink(name + SUFFIX)  # made on another disk: not this filesystem
                        continue
                    if "ino" not in entry:  # killed while it made it: empty if ours
                        _remove_if_empty(root_fd, root, name)
                        d.unlink(name + SUFFIX)
                        continue
                    ident = _identity(root_fd, name)
                    if ident is not None and ident["ino"] == entry["ino"] and \
                            ident["generation"] == entry.get("generation"):
                        found.append(name)
                    else:  # gone, or what is there now is not what the run made
                        d.unlink(name + SUFFIX)
            finally:
                os.close(root_fd)
        return found
