"""Directories the tool keeps root-owned state in (locks, restore marks, staging records, the
fleet's journal and leases), and the files in them.

A directory is used only once it is verified, component by component from / down, each opened
relative to its verified parent without following symlinks:

- every component is owned by root or by the running user;
- a parent may be writable by others only when it is sticky and owned by root (/tmp,
  /run/lock): there nobody can rename or remove an entry that is not theirs; group write is
  accepted for the root group only;
- the directory itself must not be writable by anyone else, sticky or not: nobody else can put
  a name in it, so nobody can plant a symlink or a file there for root to open;
- a symlink on the way is followed only when root or the running user owns it (as
  fs.protected_symlinks would have it), and its target is verified the same way.

Missing components are created (0755; the directory itself with the mode asked) under their
verified parent. Files are then opened relative to the directory's descriptor with O_NOFOLLOW
(and O_EXCL where a new file is made), and must be regular files of root or the running user.

A directory that fails is refused with UnsafeDirectoryError (exit 7, an environment problem:
the host must be fixed, not the command line), whose message names the component, what is
wrong with it and the remedy.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from typing import List, Optional

from vmim.errors import HostEnvironmentError

MAX_SYMLINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectoryError(HostEnvironmentError):
    """A state or lock directory (or a file in it) another user could write or replace (exit 7)."""


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _others_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0))


class SafeDir:
    """A verified directory, held open: its files are reached through its descriptor only."""

    def __init__(self, fd: int, path: str, what: str, key: str):
        self.fd = fd
        self.path = path
        self.what = what
        self.key = key

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # files ---------------------------------------------------------------

    def open(self, name: str, flags: int, mode: int = 0o644) -> int:
        """os.open of name in this directory, never through a symlink; the file must be a
        regular file of root or the running user (an UnsafeDirectoryError otherwise)."""
        _check_name(name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._unsafe(name, "is a symlink",
                                   "remove it (vmimagemanager never follows one there)") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _trusted(st.st_uid):
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else \
                f"owned by {_user(st.st_uid)}"
            raise self._unsafe(name, f"is {what}", "remove it")
        return fd

    def create(self, name: str, mode: int = 0o644) -> int:
        """A new file, opened for writing (FileExistsError when the name is taken)."""
        return self.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def read(self, name: str) -> Optional[bytes]:
        """The content of file name, or None when there is none."""
        try:
            fd = self.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def write_atomic(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Replace file name with data: a new temporary file, synced, renamed over the name
        (which replaces a symlink there, never writes through it), the directory synced."""
        _check_name(name)
        tmp = f".{name}.{os.getpid()}.tmp"
        self.unlink(tmp)  # left by a killed run that had this pid
        fd = self.create(tmp, mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise
        os.fsync(self.fd)

    def unlink(self, name: str) -> bool:
        """Remove file name; False when there was none."""
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def lstat(self, name: str) -> os.stat_result:
        _check_name(name)
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def listdir(self) -> List[str]:
        return os.listdir(self.fd)

    def subdir(self, name: str, mode: int = 0o755, *, create: bool = True) -> SafeDir:
        """A directory in this one, verified as this one was (FileNotFoundError when it is
        missing and not to be created)."""
        _check_name(name)
        path = os.path.join(self.path, name)
        fd = _open_child(self.fd, name, path, mode if create else None)
        try:
            _verify(fd, path, final=True, what=self.what, key=self.key, top=self.path)
        except BaseException:
            os.close(fd)
            raise
        return SafeDir(fd, path, self.what, self.key)

    def _unsafe(self, name: str, problem: str, remedy: str) -> UnsafeDirectoryError:
        return UnsafeDirectoryError(f"{self.what} {self.path}: {os.path.join(self.path, name)} "
                                    f"{problem}; {remedy}")


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a file name: {name!r}")


def open_dir(path: str, *, what: str = "state directory", key: str = "",
             mode: Optional[int] = 0o755) -> SafeDir:
    """Verify (and create, with mode, unless mode is None) directory path; a SafeDir to close.

    what names the directory in messages; key is the config key that sets it (the remedy
    says to change it). FileNotFoundError when it is missing and not to be created."""
    if not os.path.isabs(path):
        raise UnsafeDirectoryError(f"{what} {path}: not an absolute path; set {key or 'it'} "
                                   "to an absolute path")
    want = os.path.normpath(path)
    hops = 0
    while True:
        fd = os.open("/", _DIR_FLAGS)
        parts = [p for p in want.split("/") if p]
        here = "/"
        try:
            _verify(fd, here, final=not parts, what=what, key=key, top=path)
            for i, part in enumerate(parts):
                here = os.path.join(here, part)
                last = i == len(parts) - 1
                try:
                    child = _open_child(fd, part, here, mode if last else
                                        (0o755 if mode is not None else None))
                except _Symlink as link:
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise UnsafeDirectoryError(f"{what} {path}: too many levels of "
                                                   "symlinks") from None
                    if not _trusted(link.st.st_uid):
                        raise UnsafeDirectoryError(
                            f"{what} {path}: {here} is a symlink owned by {_user(link.st.st_uid)}"
                            f", not root: that user chooses where it leads; "
                            f"{_remedy(key, here, owned=True)}") from None
                    want = os.path.normpath(os.path.join(os.path.dirname(here), link.target,
                                                         *parts[i + 1:]))
                    break
                os.close(fd)
                fd = child
                _verify(fd, here, final=last, what=what, key=key, top=path)
            else:
                return SafeDir(fd, want, what, key)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a symlink: walk its target from /


class _Symlink(Exception):
    def __init__(self, st: os.stat_result, target: str):
        self.st = st
        self.target = target


def _open_child(parent: int, name: str, path: str, mode: Optional[int]) -> int:
    """Open directory name in parent without following it; _Symlink when it is one."""
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if mode is None:
                raise
            try:
                os.mkdir(name, mode, dir_fd=parent)
            except FileExistsError:
                pass  # made meanwhile: opened and verified like any other
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _Symlink(st, os.readlink(name, dir_fd=parent)) from None
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
    return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _verify(fd: int, here: str, *, final: bool, what: str, key: str, top: str) -> None:
    st = os.fstat(fd)
    if not _trusted(st.st_uid):
        raise UnsafeDirectoryError(
            f"{what} {top} is not safe: {here} is owned by {_user(st.st_uid)}, not root: that "
            f"user can put files there for vmimagemanager to open; "
            f"{_remedy(key, here, owned=True)}")
    if not _others_write(st):
        return
    sticky_root = bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
    if final or not sticky_root:
        who = "others" if st.st_mode & stat.S_IWOTH else f"group {st.st_gid}"
        kind = "sticky, but " if st.st_mode & stat.S_ISVTX else ""
        raise UnsafeDirectoryError(
            f"{what} {top} is not safe: {here} is {kind}writable by {who}, who could plant "
            f"or replace what vmimagemanager keeps there; {_remedy(key, here, owned=False)}")


def _remedy(key: str, here: str, *, owned: bool) -> str:
    fix = f"remove {here} (it is not vmimagemanager's)" if owned else f"chmod go-w {here}"
    if key:
        return f"{fix}, or set {key} in [vmim.local] to a directory only root can write"
    return fix
