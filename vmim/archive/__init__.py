"""Archive formats: rsync trees and compressed tar/cpio streams, behind one interface.

A format writes a tree (or some directories of it) into a new image, unpacks an image into
an empty staging directory, and tests an image's integrity without unpacking it. Formats
are chosen by name for store and extract (`FORMATS`), and by what detection found for
restore and insert (`for_detected`).
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Dict, List, Optional, Sequence, Set, Tuple

from vmim.errors import OperationError, StateError

if TYPE_CHECKING:
    from vmim.archive.detect import Detected

#: compression → (compressor argv, decompressor argv), preferring the parallel tools; for
#: gzip's decompression ISA-L's igzip (Debian: isal), 2.3× pigz's speed on one core (a
#: deflate stream does not decompress in parallel: pigz gives it one thread and a checksum
#: thread). On what gzip and pigz write it behaves as pigz: concatenated members read, a
#: truncated or damaged stream exit 1, other bytes after the last member ignored
#: (tests/unit/test_decompressors.py). It differs on what they never write: a header with
#: reserved flag bits set is read (pigz refuses it), bytes after the last member that start
#: like a gzip member are an error (pigz ignores them) — the proof and the unpack use the same
#: tool, so neither lets them disagree; its messages say less ("Error encountered while
#: decompressing") than pigz's ("crc32 mismatch").
_TOOLS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "gzip": (("pigz", "-c"), ("gzip", "-c")),
    "bzip2": (("lbzip2", "-c"), ("bzip2", "-c")),
    "zstd": (("zstd", "-q", "-T0", "-c"),),
    "xz": (("xz", "-T0", "-c"),),
}
_DETOOLS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "gzip": (("igzip", "-dc"), ("pigz", "-dc"), ("gzip", "-dc")),
    "bzip2": (("lbzip2", "-dc"), ("bzip2", "-dc")),
    "zstd": (("zstd", "-q", "-dc"),),
    "xz": (("xz", "-dc"),),
}


def _first_available(choices: Sequence[Sequence[str]]) -> List[str]:
    for argv in choices:
        if shutil.which(argv[0]):
            return list(argv)
    return list(choices[-1])  # missing: process.run reports the tool


def compressor(compression: str) -> List[str]:
    return _first_available(_TOOLS[compression])


def decompressor(compression: str) -> List[str]:
    return _first_available(_DETOOLS[compression])


class CorruptArchive(OperationError):
    """An archive's structure is damaged or cut short."""


class UnsafeMember(OperationError):
    """A member that would be written outside the directory it is unpacked into."""


class UnsupportedVariant(CorruptArchive):
    """A variant of a container that the reader does not read (cpio odc, bin)."""


@dataclass(frozen=True)
class Summary:
    """What a full read of an archive's structure found."""

    members: int
    #: bytes of member data the unpack must write (a lower bound of the space it needs): tar's
    #: data but its holes; newc's but the zero blocks its extractor leaves holes; None: unknown
    needs_bytes: Optional[int]
    #: some member carries a POSIX ACL as an ACL record of its own (GNU tar's --acls: SCHILY.acl),
    #: which the unpack must apply as such (a tar member's ACL may also, or only, be a
    #: system.posix_acl_* extended attribute, which --xattrs applies)
    acl_records: bool = True
    #: the shape the filesystem must take (vmim.archive.fits): the inodes the unpack makes, its
    #: longest name component and symlink target (bytes), the most names of one inode, the
    #: largest file (bytes)
    inodes: int = 0
    longest_component: int = 0
    longest_symlink: int = 0
    most_links: int = 1
    largest_file: int = 0


class Layout:
    """What an unpack into an empty directory has made so far, member by member: each path's
    kind ("d" directory, "l" symlink, "f" anything else). The checkers use it to refuse up front
    what the unpacker would refuse half-way, after the slot was cleared: a member through an
    earlier symlink or file, a file over a directory, a hard link to a name not (or no longer)
    there."""

    NAMES = {"d": "directory", "l": "symlink", "f": "file"}

    def __init__(self, what: str, rmdir_empty: bool = False):
        self.what = what  # "tar member", "cpio member"
        #: GNU tar removes an empty directory that a later member replaces; the newc
        #: extractor replaces no directory
        self.rmdir_empty = rmdir_empty
        self.kinds: Dict[Tuple[str, ...], str] = {(): "d"}
        self.owner: Dict[Tuple[str, ...], object] = {}  # path -> the inode key it holds
        self.nonempty: Set[Tuple[str, ...]] = set()  # directories something was put in
        #: the shape (Summary): inodes made, the longest component, names of each inode
        self.inodes = 0
        self.longest_component = 0
        self.inode_of: Dict[Tuple[str, ...], int] = {}
        self.names_of: Dict[int, int] = {}
        self.most_links = 1
        self._inodes_made = itertools.count(1)

    @staticmethod
    def parts(name: str) -> Tuple[str, ...]:
        return tuple(p for p in name.split("/") if p not in ("", "."))

    def add(self, name: str, kind: str, key: object = None, inode: Optional[int] = None) -> None:
        """A member `name` of `kind` (inode: the one it is a hard link to)."""
        parts = self.parts(name)
        if not parts:  # the archive's root entry: the directory it is unpacked into
            if kind != "d":
                raise UnsafeMember(f"{self.what} {name!r} is a {self.NAMES[kind]} that would "
                                   "replace the directory the archive is unpacked into")
            return
        for i in range(1, len(parts)):
            k = self.kinds.get(parts[:i])
            if k is None:  # a missing parent is made a directory
                k = self.kinds[parts[:i]] = "d"
                self.inodes += 1
            if k != "d":
                raise UnsafeMember(f"{self.what} {name!r} passes through {'/'.join(parts[:i])!r}"
                                   f", which an earlier member made a {self.NAMES[k]}")
        if self.kinds.get(parts) == "d" and kind != "d" and \
                (parts in self.nonempty or not self.rmdir_empty):
            raise UnsafeMember(f"{self.what} {name!r} would replace a directory")
        self.nonempty.update(parts[:i] for i in range(1, len(parts)))
        self._count(parts, inode)
        self.kinds[parts] = kind
        self.owner[parts] = key

    def _count(self, parts: Tuple[str, ...], inode: Optional[int]) -> None:
        """The shape: the inode that parts now names (a new one, or `inode`)."""
        self.longest_component = max(self.longest_component,
                                     *(len(p.encode("utf-8", "surrogateescape")) for p in parts))
        old = self.inode_of.get(parts)
        if old is not None:
            self.names_of[old] -= 1
        if inode is None:
            if parts not in self.kinds or self.kinds[parts] != "d":
                self.inodes += 1  # a directory there is kept; anything else is made anew
            inode = next(self._inodes_made)
            self.names_of[inode] = 0
        self.inode_of[parts] = inode
        self.names_of[inode] += 1
        self.most_links = max(self.most_links, self.names_of[inode])

    def link(self, name: str, target: str, kinds: str = "f", key: object = None) -> None:
        """A hard link name -> target: target must be there, of one of kinds (and hold key).
        A link of a name to itself, when the name is there, changes nothing (GNU tar)."""
        t = self.parts(target)
        if t == self.parts(name) and t in self.kinds:
            return
        if self.kinds.get(t) not in tuple(kinds) or (key is not None and self.owner.get(t) != key):
            raise UnsafeMember(f"{self.what} {name!r} is a hard link to {target!r}, which no "
                               "earlier member left there")
        self.add(name, self.kinds[t], self.owner.get(t), self.inode_of.get(t))


def skip(stream: IO[bytes], n: int) -> None:
    """Read past n bytes of stream (seek where it can: a short file shows at the next read)."""
    if n < 0:
        raise CorruptArchive("a negative size in the archive")
    if n and stream.seekable():
        stream.seek(n, 1)
        return
    while n > 0:
        got = len(stream.read(min(n, 1 << 20)))
        if not got:
            raise CorruptArchive("the archive ends early, inside a member's data (truncated?)")
        n -= got


class Format:
    """Base class of the archive formats."""

    name = ""
    is_tree = False
    #: what the format cannot carry (the store warns, the docs say so)
    cannot_carry: Tuple[str, ...] = ()

    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        """Write paths (relative to src_root; "." for all of it) into the new image dest; return
        the image's sha256 when it was computed on the way (archives)."""
        raise NotImplementedError

    def unpack(self, image: str, staging: str, acl_records: bool = True) -> None:
        """Unpack the image into the empty directory staging, in the sandbox: every member, as
        the proof read them (a restore removes the archive's lost+found from staging after:
        tree.leave_out_lost_found). acl_records False: the image is known to carry no ACL
        record of its own (Summary.acl_records, or how this tool stored it)."""
        raise NotImplementedError

    def verify(self, image: str) -> Optional[Summary]:
        """Prove the image restorable without writing anything: StateError (exit 4) when it
        is truncated, corrupt, or holds what the unpacker would refuse."""
        raise NotImplementedError

    def unpack_tools(self) -> List[str]:
        """The programs unpack() runs: checked before anything touches the slot."""
        raise NotImplementedError

    def check_tree(self, root: str, what: str) -> None:
        """Before write(): StateError when the tree holds what the format cannot carry at all;
        a warning for what it drops."""


class StreamFormat(Format):
    """An archive stream (tar or cpio), compressed or not."""

    def __init__(self, compression: Optional[str], name: str):
        self.compression = compression
        self.name = name

    def unpack_tools(self) -> List[str]:
        return [decompressor(self.compression)[0]] if self.compression else []

    def check(self, stream: IO[bytes]) -> Summary:
        """Read the container's structure from stream to its end marker (no writes)."""
        raise NotImplementedError

    def read_structure(self, image: str) -> Summary:
        """Read the whole image once, decompressing it, and check() what it holds."""
        from vmim import process

        if not self.compression:
            with open(image, "rb") as fh:
                return self.check(fh)
        with process.output_of([*decompressor(self.compression), image]) as stream:
            return self.check(stream)

    def verify(self, image: str) -> Summary:
        """Read the whole image once: the compression's own integrity check, and every member
        header to the archive's end marker (used when no sha256 was recorded)."""
        from vmim import process
        from vmim.errors import CommandError

        try:
            return self.read_structure(image)
        except CommandError as exc:
            process.check_cancelled()  # a signal stopped the decompressor: say that, not this
            raise StateError(f"image {image} is corrupt or truncated: {exc.stderr_tail}") from None
        except (CorruptArchive, UnsafeMember) as exc:
            raise StateError(f"image {image} cannot be restored: {exc}") from None


def formats() -> Dict[str, Format]:
    from vmim.archive.cpio import CpioFormat
    from vmim.archive.rsync import RsyncFormat
    from vmim.archive.tar import TarFormat

    return {
        "rsync": RsyncFormat(),
        "tgz": TarFormat("gzip", "tgz"),
        "cpio.bz2": CpioFormat("bzip2", "cpio.bz2"),
        "tar.zst": TarFormat("zstd", "tar.zst"),
    }


def for_name(name: str) -> Format:
    return formats()[name]


def for_detected(found: Detected, what: str) -> Format:
    from vmim.archive.cpio import CpioFormat
    from vmim.archive.rsync import RsyncFormat
    from vmim.archive.tar import TarFormat

    if found.container == "tree":
        return RsyncFormat()
    if found.container == "tar":
        return TarFormat(found.compression, found.format)
    if found.container == "cpio":
        return CpioFormat(found.compression, found.format)
    raise StateError(f"{what} is not an image vmimagemanager can unpack "
                     f"(found: {found.description})")
