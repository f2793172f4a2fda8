"""Image and insert stores: one flat directory each, an entry per image."""

from __future__ import annotations

import ctypes
import difflib
import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from vmim import process
from vmim.archive import detect
from vmim.errors import StateError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    name: str
    directory: str
    format: str
    size: int  # bytes: file size, or the sum of the file sizes of a tree
    mtime: float
    base_of: Tuple[str, ...] = ()  # slots whose qcow2 overlays stand on this image

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    @property
    def mtime_iso(self) -> str:
        return datetime.fromtimestamp(self.mtime, timezone.utc).isoformat(timespec="seconds")

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "directory": self.directory,
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "mtime": self.mtime_iso,
            "base_of": list(self.base_of),
        }


def tree_size(path: str) -> int:
    """Sum of the sizes of the regular files below path (symlinks not followed)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(e.path)
                    elif stat.S_ISREG(st.st_mode):
                        total += st.st_size
        except OSError:
            continue
    return total


def list_entries(directory: str) -> List[Entry]:
    """Entries of one store directory, by name. Hidden names (temporary files, metadata) are skipped."""
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        log.warning("store directory %s does not exist", directory)
        return []
    except OSError as exc:
        log.warning("cannot read store directory %s: %s", directory, exc.strerror)
        return []
    out: List[Entry] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue  # a dangling symlink or an entry that vanished
        found = detect.detect(path)
        size = tree_size(path) if stat.S_ISDIR(st.st_mode) else st.st_size
        out.append(Entry(name, directory, found.format, size, st.st_mtime))
    return out


# --------------------------------------------------------------------------- writing and finding

TMP_PREFIX = ".vmim-tmp."
OLD_PREFIX = ".vmim-old."
META_DIR = ".vmim"
RENAME_EXCHANGE = 2


def validate_name(name: str, what: str = "image") -> None:
    if not name or name in (".", "..") or "/" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"{what} name {name!r} is not allowed: it must not be empty, contain '/' "
                         "or start with '.'")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS):
            return False
        raise OSError(err, os.strerror(err), a)
    return True


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(4 * 1024 * 1024)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


class ImageStore:
    """One store directory: images (or inserts) by name, written atomically, with metadata."""

    def __init__(self, directory: str, kind: str = "image"):
        self.directory = directory
        self.kind = kind

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _check_dir(self) -> None:
        if not os.path.isdir(self.directory):
            raise StateError(f"{self.kind} store {self.directory} does not exist; create it or fix "
                             "the config")

    def find(self, name: str) -> str:
        """The path of an existing entry, or StateError listing similar names (exit 4)."""
        validate_name(name, self.kind)
        self._check_dir()
        path = self.path(name)
        if os.path.lexists(path):
            return path
        names = sorted(n for n in os.listdir(self.directory) if not n.startswith("."))
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; similar: {', '.join(close)}" if close else (
            f"; it has: {', '.join(names[:20])}" if names else "; it is empty")
        raise StateError(f"{self.kind} '{name}' not found in {self.directory}{hint}")

    # metadata -----------------------------------------------------------

    def _meta_path(self, name: str) -> str:
        return os.path.join(self.directory, META_DIR, name + ".json")

    def metadata(self, name: str) -> Optional[dict]:
        """The entry's metadata, when it describes the entry as it is now."""
        try:
            with open(self._meta_path(name), encoding="utf-8") as fh:
                meta = json.load(fh)
            st = os.stat(self.path(name))
        except (OSError, ValueError):
            return None
        if meta.get("mtime_ns") != st.st_mtime_ns or (
                not stat.S_ISDIR(st.st_mode) and meta.get("size") != st.st_size):
            return None  # changed behind our back: not to be trusted
        return meta

    def _write_meta(self, name: str, meta: dict) -> None:
        d = os.path.join(self.directory, META_DIR)
        os.makedirs(d, exist_ok=True)
        tmp = f"{self._meta_path(name)}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._meta_path(name))

    # writing ------------------------------------------------------------

    def clean_debris(self) -> List[str]:
        """Remove what killed stores left (temporary names of processes that are gone)."""
        removed = []
        debris = [n for n in os.listdir(self.directory)
                  if n.startswith((TMP_PREFIX, OLD_PREFIX)) and not process.pid_alive(n.rsplit(".", 1)[-1])]
        if debris:
            # a killed run's rsync or tar may still be writing there
            process.reap_orphans([self.path(n) for n in debris])
        for n in debris:
            process.run(["rm", "-rf", "--", self.path(n)])
            removed.append(n)
        if removed:
            log.info("removed debris of interrupted stores in %s: %s", self.directory,
                     ", ".join(removed))
        return removed

    def write(self, name: str, fmt: Any, writer: Callable[[str, str], Optional[str]],
              meta: Dict[str, Any]) -> Dict[str, Any]:
        """Write a new entry through writer(tmp_path, link_dest) and put it in place atomically:
        whatever happens before the final rename, the previous entry of that name is intact."""
        validate_name(name, self.kind)
        self._check_dir()
        if not os.access(self.directory, os.W_OK):
            raise StateError(f"{self.kind} store {self.directory} is not writable")
        self.clean_debris()
        final = self.path(name)
        tmp = self.path(f"{TMP_PREFIX}{name}.{os.getpid()}")
        link_dest = final if fmt.is_tree and os.path.isdir(final) and not os.path.islink(final) else ""
        try:
            digest = writer(tmp, link_dest)
            if fmt.is_tree:
                process.run(["sync", "--file-system", tmp])
                size = tree_size(tmp)
                meta.update(size=size)
            else:
                _fsync_path(tmp)
                meta.update(size=os.path.getsize(tmp))
                if digest:  # archives are hashed as written; disk images are checked by qemu-img
                    meta.update(sha256=digest)
            self._put_in_place(tmp, final)
        except BaseException:
            if os.path.lexists(tmp):
                subprocess.run(["rm", "-rf", "--", tmp], check=False)
            raise
        meta.update(name=name, format=fmt.name, mtime_ns=os.stat(final).st_mtime_ns)
        self._write_meta(name, meta)
        _fsync_path(self.directory)
        return meta

    def _put_in_place(self, tmp: str, final: str) -> None:
        exists = os.path.lexists(final)
        old_is_dir = exists and os.path.isdir(final) and not os.path.islink(final)
        new_is_dir = os.path.isdir(tmp)
        if old_is_dir and new_is_dir and _exchange(tmp, final):
            process.run(["rm", "-rf", "--", tmp])  # tmp now holds the old tree
        elif exists and (old_is_dir or new_is_dir):
            # A tree on either side: no atomic replace; set the old one aside, and put it back
            # if the new one cannot take its place (an interruption between the two renames).
            old = self.path(f"{OLD_PREFIX}{os.path.basename(final)}.{os.getpid()}")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                if not os.path.lexists(final):
                    os.rename(old, final)
                raise
            process.run(["rm", "-rf", "--", old])
        else:
            os.replace(tmp, final)
        _fsync_path(self.directory)
