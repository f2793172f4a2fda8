"""Image and insert stores: one flat directory each, an entry per image."""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from vmim import digest as digest_mod
from vmim import process, procscan
from vmim.archive import detect
from vmim.errors import EXIT_COMMAND, CommandError, StateError, UsageError, VmimError

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


def stored_size(meta: Optional[dict], path: str) -> int:
    """An entry's size as its metadata (ImageStore.metadata) recorded it when stored, else as
    measured: a file's size, or the sum over a tree's files — those this user reaches: a
    tree's top is root's only, so another user's sum is 0."""
    size = (meta or {}).get("size")
    if isinstance(size, int):
        return size
    return tree_size(path) if os.path.isdir(path) else os.path.getsize(path)


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
        size, mtime = st.st_size, st.st_mtime
        if stat.S_ISDIR(st.st_mode):  # a tree's own mtime is its source root's: say when stored
            meta = ImageStore(directory).metadata(name)
            size, mtime = stored_size(meta, path), _stored_time(meta) or mtime
        out.append(Entry(name, directory, found.format, size, mtime))
    return out


def _stored_time(meta: Optional[dict]) -> Optional[float]:
    """When the store recorded the entry as written (its metadata's "stored"), as a timestamp."""
    try:
        return datetime.strptime(str((meta or {})["stored"]), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- writing and finding

TMP_PREFIX = ".vmim-tmp."
OLD_PREFIX = ".vmim-old."
META_DIR = ".vmim"
RENAME_EXCHANGE = 2
NAME_MAX = 255  # bytes in one file name
_HASHED = re.compile(r"~[0-9a-f]{16}$")


def validate_name(name: str, what: str = "image") -> None:
    if not name or name in (".", "..") or "/" in name or name.startswith(".") or "\0" in name:
        where = "-L" if what == "image" else "--list-inserts"
        raise UsageError(f"{what} name {name!r} is not allowed: it must not be empty, contain '/' "
                         f"or start with '.'; {what}s are named as in their store ({where} "
                         "lists them), not by a path")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UsageError(f"{what} name {name[:40]!r}... is too long: at most {NAME_MAX} bytes")


def fit_name(stem: str, suffix: str) -> str:
    """stem + suffix as one file name: when that is longer than NAME_MAX bytes, stem is cut
    and ends in '~' and a hash of the whole stem, so that distinct stems stay distinct."""
    raw = os.fsencode(stem + suffix)
    if len(raw) <= NAME_MAX:
        return stem + suffix
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:16]
    room = NAME_MAX - len(os.fsencode(suffix)) - 1 - len(digest)
    cut = os.fsencode(stem)[:room].decode("utf-8", "ignore")  # no half character
    return f"{cut}~{digest}{suffix}"


def _work_name(prefix: str, name: str) -> str:
    """The name of this run's temporary (or set-aside) entry for entry `name`."""
    return fit_name(prefix + name, f".{os.getpid()}")


def _debris_of(debris: str) -> Optional[str]:
    """The entry name a temporary or set-aside name was made for; None when it was cut to fit
    (then it does not tell)."""
    stem = debris.rsplit(".", 1)[0]
    name = stem[len(OLD_PREFIX if stem.startswith(OLD_PREFIX) else TMP_PREFIX):]
    if len(os.fsencode(debris)) > NAME_MAX - 4 and _HASHED.search(stem):
        return None
    return name


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


class StoreFullError(VmimError):
    """The store's filesystem filled up while an entry was written: exit 6, as when the command
    writing it fails (which is how it shows), with a message that says so."""

    exit_code = EXIT_COMMAND


#: less free space than this after a failed write: the store's filesystem was full
FULL_MARGIN = 1 << 20


def _out_of_space(directory: str, exc: BaseException) -> bool:
    """Whether a failed write into directory failed for want of space (or inodes): the error
    says so, or the filesystem is (still, before the temporary entry goes) all but full. Some
    writers (rsync) report only a broken pipe or an I/O error."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    try:
        vfs = os.statvfs(directory)
    except OSError:
        return False
    return vfs.f_bfree * vfs.f_frsize < FULL_MARGIN or (vfs.f_files > 0 and vfs.f_ffree == 0)


def _remove(path: str) -> None:
    """rm -rf of an entry of the store or what a store set aside, which may be a guest's tree
    (rsync): in the sandbox, which sees the store's directory only, never crossing into
    another filesystem, as every removal of guest data (vmim.tree.remove)."""
    from vmim import tree

    tree.remove(os.path.dirname(path), [os.path.basename(path)])


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def _meta_path(self, name: str, suffix: str = "") -> str:
        return os.path.join(self.directory, META_DIR, fit_name(name, ".json" + suffix))

    def metadata(self, name: str) -> Optional[dict]:
        """The entry's metadata, when it describes the entry as it is now."""
        try:
            with open(self._meta_path(name), encoding="utf-8") as fh:
                meta = json.load(fh)
            st = os.stat(self.path(name))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(meta, dict):
            return None
        if meta.get("mtime_ns") != st.st_mtime_ns or (
                not stat.S_ISDIR(st.st_mode) and meta.get("size") != st.st_size):
            return None  # changed behind our back: not to be trusted
        return meta

    def _write_meta(self, name: str, meta: dict) -> None:
        d = os.path.join(self.directory, META_DIR)
        os.makedirs(d, exist_ok=True)
        tmp = self._meta_path(name, f".{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._meta_path(name))

    # writing ------------------------------------------------------------

    def clean_debris(self) -> List[str]:
        """Remove what killed stores left (temporary names of processes that are gone), never
        the only copy of a name: a set-aside entry whose name is empty goes back to it."""
        removed = []
        debris = sorted(n for n in os.listdir(self.directory)
                        if n.startswith((TMP_PREFIX, OLD_PREFIX))
                        and not procscan.pid_alive(n.rsplit(".", 1)[-1]))
        if debris:
            # a killed run's rsync or tar may still be writing there
            procscan.reap_orphans([self.path(n) for n in debris])
        for n in debris:
            if n.startswith(OLD_PREFIX):  # a complete entry, set aside by a run killed next
                name = _debris_of(n)
                if name is None:
                    log.warning("kept %s: a store that was interrupted set it aside, and its name "
                                "does not tell which image it was; rename it to its image name "
                                "or remove it", self.path(n))
                    continue
                if not os.path.lexists(self.path(name)):
                    os.rename(self.path(n), self.path(name))
                    log.warning("%s: put image '%s' back under its name: the store that was "
                                "replacing it was interrupted", self.directory, name)
                    continue
            _remove(self.path(n))
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
        # The new entry is written in a directory of its own that only root enters, and renamed
        # out of it whole: a tree's top takes the guest root's mode (0755) as rsync writes it,
        # and no other user reaches the guest's setuid programs and device nodes meanwhile.
        work = self.path(_work_name(TMP_PREFIX, name))
        tmp = os.path.join(work, name)
        link_dest = final if fmt.is_tree and os.path.isdir(final) and not os.path.islink(final) else ""
        previous = os.path.lexists(final)
        try:
            os.mkdir(work, 0o700)
            digest = writer(tmp, link_dest)
            if fmt.is_tree:
                process.run(["sync", "--file-system", tmp])
                size = tree_size(tmp)
                meta.update(size=size)
            else:
                _fsync_path(tmp)
                meta.update(size=os.path.getsize(tmp))
                if digest:  # archives are hashed as written; disk images are checked by qemu-img
                    meta.update(digest_mod.as_meta(digest))
            self._put_in_place(tmp, final)
        except BaseException as exc:
            full = isinstance(exc, (CommandError, OSError)) and _out_of_space(self.directory, exc)
            if os.path.lexists(work):
                with contextlib.suppress(VmimError, OSError):
                    _remove(work)
            if full:
                kept = (f"the previous {self.kind} '{name}' is kept as it was" if previous
                        else f"no {self.kind} '{name}' was made")
                raise StoreFullError(
                    f"{self.kind} store {self.directory} is full: storing '{name}' needs more "
                    f"room than it has; {kept} and nothing of this store is left; free space "
                    f"there or store elsewhere, then try again ({exc})") from None
            raise
        meta.update(name=name, format=fmt.name, mtime_ns=os.stat(final).st_mtime_ns)
        try:
            self._write_meta(name, meta)
        except OSError as exc:  # the image is in place: the store succeeded
            log.warning("%s '%s' is stored, but its metadata could not be written (%s: %s): "
                        "lists will read it again, and a restore will verify it by a full read",
                        self.kind, name, exc.filename or self.directory, exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(self._meta_path(name))  # an earlier entry's, not to be trusted
        _fsync_path(self.directory)
        # Only now, with the new entry and its metadata in place: the old entry swapped out
        # into work goes (a failure or a kill here leaves debris, which clean_debris removes,
        # never the new entry described by the old one's metadata)
        try:
            os.rmdir(work)
        except OSError:
            try:
                _remove(work)
            except (VmimError, OSError) as exc:
                log.warning("%s '%s' is stored; the previous one, set aside in %s, could not be "
                            "removed yet (%s): the next store removes it", self.kind, name,
                            work, exc)
        return meta

    def _put_in_place(self, tmp: str, final: str) -> None:
        """The name resolves to the old entry or to the new one at every instant; tmp holds
        the old entry after an exchange, for the caller to remove."""
        exists = os.path.lexists(final)
        old_is_dir = exists and os.path.isdir(final) and not os.path.islink(final)
        new_is_dir = os.path.isdir(tmp)
        if exists and (old_is_dir or new_is_dir) and _exchange(tmp, final):
            pass  # one atomic swap, a tree and a file alike
        elif exists and (old_is_dir or new_is_dir):
            # No renameat2 here: set the old one aside, and put it back if the new one cannot
            # take its place; a kill between the two renames is mended by clean_debris().
            old = self.path(_work_name(OLD_PREFIX, os.path.basename(final)))
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                if not os.path.lexists(final):
                    os.rename(old, final)
                raise
            _remove(old)
        else:
            os.replace(tmp, final)
        _fsync_path(self.directory)
