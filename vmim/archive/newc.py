"""A safe extractor for cpio "newc" streams.

GNU cpio follows a symlink that an earlier member of the same archive created, and so writes
outside the target directory (a member `evil -> /etc` followed by `evil/passwd`). This reader
creates every member relative to directory file descriptors opened with O_NOFOLLOW, so no
member can pass through a symlink; `..` and absolute names are refused. It keeps numeric
owners, modes (setuid, setgid, sticky), mtimes, hard links, symlinks, device nodes and FIFOs.
newc has no hole map: every block of BLOCK zero bytes (aligned in the file) is written as a
hole, so sparse files stay sparse, and allocated zero blocks become holes too.

Nothing but a regular file this reader has just created (O_CREAT|O_EXCL|O_NOFOLLOW) is ever
opened: device nodes, FIFOs, sockets and symlinks are made with mknod()/symlink(), and a hard
link group (members sharing an inode number, nlink > 1) is made as GNU cpio makes it, with
link() to its first member whatever that is (symlinks excepted, as in GNU cpio). When a later
member of a group of regular files carries the data (GNU cpio writes it with the last name),
it goes into a new file, to which the earlier names are then linked again: data never goes
through a name an earlier member made, which a device node or a FIFO could have taken since.

`check` walks a stream's headers to the trailer without writing anything: restore proves an
image with it before the slot is cleared.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO, Dict, List, Tuple

from vmim.archive import (
    CorruptArchive,
    Layout,
    Summary,
    UnsafeMember,
    UnsupportedVariant,
    fits,
    skip,
)
from vmim.errors import EXIT_COMMAND, OperationError, full_disk

HEADER = 110
#: the longest member name read (the extractor walks a name one directory at a time, so a
#: name may be longer than PATH_MAX; none of a real tree is near this)
MAX_NAME = 1 << 16
CHUNK = 1024 * 1024
ZEROS = bytes(CHUNK)
#: the granularity of the holes the extractor makes (a filesystem block)
BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
TRAILER = b"TRAILER!!!"
NEWC_MAGICS = (b"070701", b"070702")
#: the other cpio variants, which this reader refuses: GNU cpio's default is "bin"
OTHER_VARIANTS = {b"070707": "odc (portable ASCII)", b"\xc7\x71": "bin (old binary)",
                  b"\x71\xc7": "bin (old binary)"}


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


#: what identifies a hard link group in a newc stream: (devmajor, devminor, ino)
Key = Tuple[int, int, int]


def group_key(h: Dict[str, int]) -> Key | None:
    """The hard link group a member belongs to (None: a member of its own). Directories are
    never linked (their link count counts their subdirectories), nor symlinks (as GNU cpio:
    each is made from its own target)."""
    if h["nlink"] < 2 or stat.S_IFMT(h["mode"]) in (stat.S_IFDIR, stat.S_IFLNK):
        return None
    return (h["devmajor"], h["devminor"], h["ino"])


class _Group:
    """A hard link group as made so far: its names (root-relative) and the inode they share
    ((st_dev, st_ino), to see that no later member replaced one of them)."""

    def __init__(self, name: bytes, inode: Tuple[int, int]):
        self.names = [name]
        self.inode = inode


class Extractor:
    def __init__(self, root: str):
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.groups: Dict[Key, _Group] = {}
        #: the names of groups' members -> their group, until a later member takes the name
        #: (inode numbers alone do not tell: a node made in a removed file's place may get its)
        self.group_of: Dict[bytes, Key] = {}
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
            if stat.S_IFMT(h["mode"]) != stat.S_IFDIR:
                raise UnsafeMember(f"cpio member {name!r} is not a directory and would replace "
                                   "the directory the archive is unpacked into")
            self._skip(stream, size)
            self.dir_times.append((b".", h["mtime"]))
            os.chown(self.root_fd, h["uid"], h["gid"])
            os.chmod(self.root_fd, stat.S_IMODE(h["mode"]))
            return
        mode = h["mode"]
        fmt = stat.S_IFMT(mode)
        dfd = self._parent(parts)
        leaf = parts[-1]
        key = group_key(h)
        try:
            if key in self.groups and b"/".join(parts) in self.groups[key].names:
                raise UnsafeMember(f"cpio member {name!r} comes twice in its hard link group")
            self._remove_existing(leaf, dfd, fmt == stat.S_IFDIR)
            self.group_of.pop(b"/".join(parts), None)
            if key in self.groups:
                self._link(h, key, parts, leaf, dfd, stream)
            elif fmt == stat.S_IFDIR:
                try:
                    os.mkdir(leaf, 0o700, dir_fd=dfd)
                except FileExistsError:
                    pass
                self._skip(stream, size)
                self.dir_times.append((b"/".join(parts), h["mtime"]))
            elif fmt == stat.S_IFLNK:
                if not size:
                    raise UnsafeMember(f"cpio member {name!r} is a symlink to nothing (it "
                                       "cannot be made)")
                target = symlink_target(stream, name, size)
                self._skip(stream, _pad(size), exact=True)
                os.symlink(target, leaf, dir_fd=dfd)
            elif fmt == stat.S_IFREG:
                self._create(h, leaf, dfd, stream)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                self._skip(stream, size)
                dev = os.makedev(h["rdevmajor"], h["rdevminor"])
                os.mknod(leaf, fmt | 0o600, dev, dir_fd=dfd)
            else:
                raise CorruptArchive(f"cpio member {name!r} has an unknown type {oct(fmt)}")
            if key is not None and key not in self.groups:
                st = os.lstat(leaf, dir_fd=dfd)
                self.groups[key] = _Group(b"/".join(parts), (st.st_dev, st.st_ino))
                self.group_of[b"/".join(parts)] = key
            os.chown(leaf, h["uid"], h["gid"], dir_fd=dfd, follow_symlinks=False)
            # what is there now, not what the header says (a linked member is its group's)
            if not stat.S_ISLNK(os.lstat(leaf, dir_fd=dfd).st_mode):
                os.chmod(leaf, stat.S_IMODE(mode), dir_fd=dfd)  # after chown: keeps setuid
            os.utime(leaf, (h["mtime"], h["mtime"]), dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)

    def _create(self, h: Dict[str, int], leaf: bytes, dfd: int, stream: IO[bytes]) -> None:
        """A new regular file holding the member's data."""
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=dfd)
        self._write(fd, h["filesize"], stream)

    def _holds(self, name: bytes, key: Key) -> bool:
        """name still holds the group's inode (no later member replaced it)."""
        if self.group_of.get(name) != key:
            return False
        try:
            st = os.lstat(name, dir_fd=self.root_fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.groups[key].inode

    def _link(self, h: Dict[str, int], key: Key, parts: List[bytes], leaf: bytes, dfd: int,
              stream: IO[bytes]) -> None:
        """A later member of a hard link group: a link to the group's first name; with data
        (a group of regular files), a new file to which the earlier names are linked again."""
        group = self.groups[key]
        if not self._holds(group.names[0], key):
            raise UnsafeMember(f"cpio member {b'/'.join(parts)!r} is a hard link to "
                               f"{group.names[0]!r}, which a later member replaced")
        first = os.lstat(group.names[0], dir_fd=self.root_fd)
        if h["filesize"] and stat.S_ISREG(first.st_mode) and \
                stat.S_IFMT(h["mode"]) == stat.S_IFREG:
            self._create(h, leaf, dfd, stream)
            st = os.lstat(leaf, dir_fd=dfd)
            for name in group.names:
                if self._holds(name, key):  # else a later member took that name: its own
                    os.unlink(name, dir_fd=self.root_fd)
                    os.link(leaf, name, src_dir_fd=dfd, dst_dir_fd=self.root_fd,
                            follow_symlinks=False)
            group.inode = (st.st_dev, st.st_ino)
        else:  # as GNU cpio: the member is the group's inode, whatever its own type says
            self._skip(stream, h["filesize"])
            os.link(group.names[0], leaf, src_dir_fd=self.root_fd, dst_dir_fd=dfd,
                    follow_symlinks=False)
        group.names.append(b"/".join(parts))
        self.group_of[b"/".join(parts)] = key

    def _write(self, fd: int, size: int, stream: IO[bytes]) -> None:
        try:
            left = size
            while left:
                chunk = _read_exact(stream, min(CHUNK, left))
                _write_sparse(fd, chunk)
                left -= len(chunk)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self._skip(stream, _pad(size), exact=True)

    def _skip(self, stream: IO[bytes], n: int, exact: bool = False) -> None:
        _skip(stream, n, exact)

    def finish(self) -> None:
        """Directory mtimes last, deepest first (creating children changed them)."""
        for path, mtime in sorted(self.dir_times, key=lambda t: t[0].count(b"/"), reverse=True):
            os.utime(path, (mtime, mtime), dir_fd=self.root_fd, follow_symlinks=False)


def _skip(stream: IO[bytes], n: int, exact: bool = False) -> None:
    """Read past n bytes of member data (and its padding, unless exact)."""
    skip(stream, n if exact else n + _pad(n))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _data_runs(chunk: bytes) -> List[Tuple[int, int]]:
    """The (start, end) runs of chunk the extractor writes: all but every zero BLOCK, which
    it leaves a hole (chunks start on a block boundary of the file: CHUNK is a multiple of
    BLOCK). The proof counts what they hold (check) as the unpack writes them."""
    if chunk == ZEROS[: len(chunk)]:
        return []
    view = memoryview(chunk)
    runs = []
    start = 0  # the start of the data run not yet closed
    for at in range(0, len(chunk), BLOCK):
        block = view[at:at + BLOCK]
        if len(block) == BLOCK and block == ZERO_BLOCK:
            if start < at:
                runs.append((start, at))
            start = at + BLOCK
    if start < len(chunk):
        runs.append((start, len(chunk)))
    return runs


def _write_sparse(fd: int, chunk: bytes) -> None:
    """Write chunk at fd's offset, leaving every zero BLOCK as a hole (_data_runs)."""
    view = memoryview(chunk)
    at = 0
    for start, end in _data_runs(chunk):
        if start > at:
            os.lseek(fd, start - at, os.SEEK_CUR)
        _write_all(fd, view[start:end])
        at = end
    if at < len(chunk):
        os.lseek(fd, len(chunk) - at, os.SEEK_CUR)


def _data_bytes(stream: IO[bytes], size: int) -> int:
    """Read past a regular file's data (and its padding): the bytes the extractor writes of it
    (not its zero blocks)."""
    written = 0
    left = size
    while left:
        chunk = _read_exact(stream, min(CHUNK, left))
        written += sum(end - start for start, end in _data_runs(chunk))
        left -= len(chunk)
    _skip(stream, _pad(size), exact=True)
    return written


FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
          "rdevmajor", "rdevminor", "namesize", "check")


def read_header(stream: IO[bytes]) -> Tuple[Dict[str, int], bytes]:
    """The next member's header fields and name (the trailer's name is TRAILER)."""
    raw = stream.read(HEADER)
    if not raw:
        raise CorruptArchive("cpio archive ends without its trailer (truncated?)")
    variant = OTHER_VARIANTS.get(raw[:6]) or OTHER_VARIANTS.get(raw[:2])
    if variant:
        raise UnsupportedVariant(f"a cpio archive in the {variant} variant, which vmimagemanager "
                                 "does not read; re-make it with 'cpio -o -H newc'")
    if len(raw) < HEADER or raw[:6] not in NEWC_MAGICS:
        raise CorruptArchive("not a cpio newc archive, or a corrupt one (a header is damaged or "
                             "the archive ends early)")
    try:
        h = {f: int(raw[6 + 8 * i: 14 + 8 * i], 16) for i, f in enumerate(FIELDS)}
    except ValueError:
        raise CorruptArchive("corrupt cpio header") from None
    if h["namesize"] < 1:
        raise CorruptArchive("corrupt cpio header (empty name)")
    if h["namesize"] > MAX_NAME:  # read into memory: not 4 GiB because a header says so
        raise CorruptArchive(f"a cpio member's name of {h['namesize']} bytes (more than "
                             f"{MAX_NAME}): a corrupt header")
    name = _read_exact(stream, h["namesize"])[:-1]
    _read_exact(stream, _pad(HEADER + h["namesize"]))
    if b"\0" in name:  # no system call takes it: the unpack would fail after the clear
        raise UnsafeMember(f"cpio member {name!r} has a NUL byte inside its name")
    return h, name


def symlink_target(stream: IO[bytes], name: bytes, size: int) -> bytes:
    """The target of a symlink member (its data), read by the proof as by the unpack: one
    with a NUL byte inside is refused (symlink() cannot make it)."""
    target = _read_exact(stream, size)
    if b"\0" in target:
        raise UnsafeMember(f"cpio member {name!r} is a symlink to a target with a NUL byte "
                           "inside (no symlink can hold it)")
    return target


def extract(stream: IO[bytes], root: str) -> int:
    """Extract a newc stream into the directory root; return the number of members."""
    ex = Extractor(root)
    count = 0
    try:
        while True:
            h, name = read_header(stream)
            if name == TRAILER:
                break
            try:
                ex.member(h, name, stream)
            except OSError as exc:  # a hard link to a name a later member replaced, ENOSPC...
                shown = name.decode("utf-8", "backslashreplace")
                error = OperationError(f"cannot unpack cpio member {shown!r}: "
                                       f"{exc.strerror or exc}")
                if full_disk(exc):
                    error.exit_code = EXIT_COMMAND
                raise error from None
            count += 1
        ex.finish()
    finally:
        ex.close()
    return count


def check(stream: IO[bytes]) -> Summary:
    """Read every header of a newc stream to its trailer, skipping the data, refusing what the
    extractor would refuse (unsafe names, unknown types): CorruptArchive or UnsafeMember."""
    members = 0
    longest_symlink = 0
    data = 0  # bytes of file data the extractor writes (not its holes): a lower bound
    layout = Layout("cpio member")
    links: Dict[Key, List[str]] = {}  # as Extractor.groups: the names of a group, first first
    while True:
        h, name = read_header(stream)
        if name == TRAILER:
            # zero blocks become holes: sizes bound nothing, nor the largest file (4 GiB);
            # the data written does (a lower bound: its blocks, directories, inodes come on top)
            return Summary(members, data or None, inodes=layout.inodes,
                           longest_component=layout.longest_component,
                           longest_symlink=longest_symlink, most_links=layout.most_links)
        parts = _components(name)
        fmt = stat.S_IFMT(h["mode"])
        if fmt not in _TYPES:
            raise CorruptArchive(f"cpio member {name!r} has an unknown type {oct(h['mode'])}")
        if not parts and fmt != stat.S_IFDIR:
            raise UnsafeMember(f"cpio member {name!r} is not a directory and would replace "
                               "the directory the archive is unpacked into")
        if fmt == stat.S_IFLNK and not h["filesize"] and parts:
            raise UnsafeMember(f"cpio member {name!r} is a symlink to nothing (it cannot be "
                               "made)")
        text = name.decode("utf-8", "surrogateescape")
        if fmt == stat.S_IFLNK:
            fits.symlink_ok("cpio member", text, h["filesize"])
            longest_symlink = max(longest_symlink, h["filesize"])
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            fits.device_ok("cpio member", text, h["rdevmajor"], h["rdevminor"])
        key = group_key(h)
        if key is not None and key in links:
            if Layout.parts(text) in [Layout.parts(n) for n in links[key]]:
                raise UnsafeMember(f"cpio member {name!r} comes twice in its hard link group")
            # the group's inode, whatever this member's type says (kinds: all but directories)
            layout.link(text, links[key][0], kinds="fl", key=key)
            links[key].append(text)
        else:
            layout.add(text, "d" if fmt == stat.S_IFDIR else "l" if fmt == stat.S_IFLNK else "f",
                       key)
            if key is not None:
                links[key] = [text]
        if fmt == stat.S_IFLNK:  # its target, read as the unpack reads it
            symlink_target(stream, name, h["filesize"])
            _skip(stream, _pad(h["filesize"]), exact=True)
        elif fmt == stat.S_IFREG:
            data += _data_bytes(stream, h["filesize"])
        else:
            _skip(stream, h["filesize"])
        members += 1


_TYPES = (stat.S_IFDIR, stat.S_IFLNK, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
          stat.S_IFSOCK)
