"""A safe extractor for cpio "newc" streams.

GNU cpio follows a symlink that an earlier member of the same archive created, and so writes
outside the target directory (a member `evil -> /etc` followed by `evil/passwd`). This reader
creates every member relative to directory file descriptors opened with O_NOFOLLOW, so no
member can pass through a symlink; `..` and absolute names are refused. It keeps numeric
owners, modes (setuid, setgid, sticky), mtimes, hard links, symlinks, device nodes and FIFOs,
and writes runs of zeros as holes (sparse files stay sparse).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO, Dict, List, Tuple

from vmim.errors import OperationError

HEADER = 110
CHUNK = 1024 * 1024
ZEROS = bytes(CHUNK)
TRAILER = b"TRAILER!!!"


class CorruptArchive(OperationError):
    pass


class UnsafeMember(OperationError):
    pass


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CorruptArchive(f"cpio archive ends early (wanted {n} bytes, got {len(data)})")
    return data


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _components(name: bytes) -> List[bytes]:
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if name.startswith(b"/") or b".." in parts:
        raise UnsafeMember(f"cpio member {name!r} is absolute or contains '..'")
    return parts


class Extractor:
    def __init__(self, root: str):
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.links: Dict[Tuple[int, int, int], bytes] = {}
        self.dir_times: List[Tuple[bytes, int]] = []

    def close(self) -> None:
        os.close(self.root_fd)

    def _parent(self, parts: List[bytes]) -> int:
        """An fd of the directory holding the member, creating missing directories."""
        fd = os.dup(self.root_fd)
        try:
            for p in parts[:-1]:
                try:
                    nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(p, 0o755, dir_fd=fd)
                    nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeMember(f"cpio member {b'/'.join(parts)!r} passes through "
                                           f"{p!r}, which is not a directory") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _remove_existing(self, name: bytes, dfd: int, is_dir: bool) -> None:
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not is_dir:
                raise UnsafeMember(f"cpio member {name!r} would replace a directory")
            return
        os.unlink(name, dir_fd=dfd)

    def member(self, h: Dict[str, int], name: bytes, stream: IO[bytes]) -> None:
        parts = _components(name)
        size = h["filesize"]
        if not parts:  # the archive's root entry "."
            self._skip(stream, size)
            self.dir_times.append((b".", h["mtime"]))
            os.chown(self.root_fd, h["uid"], h["gid"])
            os.chmod(self.root_fd, stat.S_IMODE(h["mode"]))
            return
        mode = h["mode"]
        fmt = stat.S_IFMT(mode)
        dfd = self._parent(parts)
        leaf = parts[-1]
        try:
            self._remove_existing(leaf, dfd, fmt == stat.S_IFDIR)
            if fmt == stat.S_IFDIR:
                try:
                    os.mkdir(leaf, 0o700, dir_fd=dfd)
                except FileExistsError:
                    pass
                self._skip(stream, size)
                self.dir_times.append((b"/".join(parts), h["mtime"]))
            elif fmt == stat.S_IFLNK:
                target = _read_exact(stream, size)
                self._skip(stream, _pad(size), exact=True)
                os.symlink(target, leaf, dir_fd=dfd)
            elif fmt == stat.S_IFREG:
                self._regular(h, parts, leaf, dfd, stream)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                self._skip(stream, size)
                dev = os.makedev(h["rdevmajor"], h["rdevminor"])
                os.mknod(leaf, fmt | 0o600, dev, dir_fd=dfd)
            else:
                raise CorruptArchive(f"cpio member {name!r} has an unknown type {oct(fmt)}")
            os.chown(leaf, h["uid"], h["gid"], dir_fd=dfd, follow_symlinks=False)
            if fmt != stat.S_IFLNK:
                os.chmod(leaf, stat.S_IMODE(mode), dir_fd=dfd)  # after chown: keeps setuid
                os.utime(leaf, (h["mtime"], h["mtime"]), dir_fd=dfd)
            else:
                os.utime(leaf, (h["mtime"], h["mtime"]), dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)

    def _regular(self, h: Dict[str, int], parts: List[bytes], leaf: bytes, dfd: int,
                 stream: IO[bytes]) -> None:
        size = h["filesize"]
        key = (h["devmajor"], h["devminor"], h["ino"])
        first = self.links.get(key) if h["nlink"] > 1 else None
        if first is not None:
            # A hard link: GNU cpio stores the data with one of the names only.
            os.link(first, leaf, src_dir_fd=self.root_fd, dst_dir_fd=dfd, follow_symlinks=False)
            if size:
                fd = os.open(leaf, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, dir_fd=dfd)
                self._write(fd, size, stream)
            return
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        self._write(fd, size, stream)
        if h["nlink"] > 1:
            self.links[key] = b"/".join(parts)

    def _write(self, fd: int, size: int, stream: IO[bytes]) -> None:
        try:
            left = size
            while left:
                chunk = _read_exact(stream, min(CHUNK, left))
                if chunk == ZEROS[: len(chunk)]:
                    os.lseek(fd, len(chunk), os.SEEK_CUR)  # a hole
                else:
                    _write_all(fd, chunk)
                left -= len(chunk)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self._skip(stream, _pad(size), exact=True)

    def _skip(self, stream: IO[bytes], n: int, exact: bool = False) -> None:
        if not exact:
            n += _pad(n)
        while n:
            got = len(_read_exact(stream, min(CHUNK, n)))
            n -= got

    def finish(self) -> None:
        """Directory mtimes last, deepest first (creating children changed them)."""
        for path, mtime in sorted(self.dir_times, key=lambda t: t[0].count(b"/"), reverse=True):
            os.utime(path, (mtime, mtime), dir_fd=self.root_fd, follow_symlinks=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
          "rdevmajor", "rdevminor", "namesize", "check")


def extract(stream: IO[bytes], root: str) -> int:
    """Extract a newc stream into the directory root; return the number of members."""
    ex = Extractor(root)
    count = 0
    try:
        while True:
            raw = stream.read(HEADER)
            if not raw:
                raise CorruptArchive("cpio archive ends without its trailer (truncated?)")
            if len(raw) < HEADER or raw[:6] not in (b"070701", b"070702"):
                raise CorruptArchive("not a cpio newc archive, or a corrupt one")
            try:
                h = {f: int(raw[6 + 8 * i: 14 + 8 * i], 16) for i, f in enumerate(FIELDS)}
            except ValueError:
                raise CorruptArchive("corrupt cpio header") from None
            name = _read_exact(stream, h["namesize"])[:-1]
            _read_exact(stream, _pad(HEADER + h["namesize"]))
            if name == TRAILER:
                break
            ex.member(h, name, stream)
            count += 1
        ex.finish()
    finally:
        ex.close()
    return count
