"""tar streams, compressed with gzip (pigz), zstd, bzip2 or xz, or not at all.

Written and unpacked by GNU tar, and proven by it: before the slot is cleared, `prove` has GNU
tar read every header of the image with the unpack's own options, writing nothing (see
PROVE_DATA and PROVE_LINKS: two readings from one decompression, which between them read every
member as --extract does): the same header decoding and framing, pax and global pax records,
GNU long names and sparse maps, numeric ranges. What GNU tar would refuse is so refused while
the slot is intact (one exception, stricter: a member of a type GNU tar does not know is an
error for --diff, a warning for --extract). What only an unpack onto a filesystem shows (a
member through an earlier symlink, a file over a directory that is not empty or over the root,
a hard link to a name not there) is checked on GNU tar's own listing by vmim.archive.Layout,
and so is the end-of-archive marker, which GNU tar does not require (an archive cut at a member
boundary would restore half a tree without a word).

GNU tar runs in the sandbox (vmim.sandbox) whenever it reads guest data: to write or read a
slot it sees the slot (or the staging directory) at a fixed name and nothing else of the host;
the proof sees an empty directory only and keeps no capability (NONE). The (de)compressor,
which reads or writes the image file in the store, runs outside.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from typing import IO, Dict, List, Optional, Sequence, Set, Tuple

from vmim import process, sandbox, scratch
from vmim.archive import (
    CorruptArchive,
    Layout,
    StreamFormat,
    Summary,
    UnsafeMember,
    compressor,
    decompressor,
    fits,
)
from vmim.errors import CommandError, StateError

# XFS shows its POSIX ACLs a second time as trusted.SGI_ACL_*: --acls carries them already.
# --xattrs-include=* carries every ACL a second time, as the system.posix_acl_access and
# system.posix_acl_default attributes: an archive this tool writes holds each ACL both ways.
XATTRS = ["--xattrs", "--xattrs-include=*", "--xattrs-exclude=trusted.SGI_ACL_*", "--acls"]
#: --warning=no-file-ignored: a socket is not archived (the program listening on it makes it
#: anew at boot), which GNU tar would say of each, on every store of a guest running postfix,
#: say; what tools say on their way to success is printed (vmim.stages), for what matters.
CREATE = ["--format=posix", "--numeric-owner", *XATTRS,
          "--sparse", "--one-file-system", "--pax-option=delete=atime,delete=ctime",
          "--warning=no-file-ignored"]
#: --ignore-zeros: a lone zero block before more members (Java's plexus archiver writes them)
#: would otherwise end the unpack there, with exit 0 and the rest of the tree missing.
#: --blocking-factor=2048: read the archive 1 MiB at a time, not in 10 KiB records (GNU
#: tar reads a pipe with --read-full-records, so a larger factor than the archive's reads it
#: as written: its manual says so, for an archive whose factor is not known); 13 % less wall
#: and a quarter less system time for tar and zstd unpacking Debian 12 (650 MB, 13,613
#: files) into tmpfs, 2026-12-08 — the proof reads with it too.
EXTRACT = ["--numeric-owner", "--same-owner", "--preserve-permissions", "--ignore-zeros",
           "--blocking-factor=2048", *XATTRS]
#: The unpack of an archive that holds no ACL record (SCHILY.acl) into a directory without
#: an ACL: with --acls GNU tar sets an ACL made from the mode on every member that has none
#: (one setxattr of system.posix_acl_access each: 55,926 for the bench corpus, about 5 % of
#: its restore), which changes nothing there. The ACLs an archive holds as attributes only
#: still come back through --xattrs.
EXTRACT_NO_ACL_RECORDS = [f for f in EXTRACT if f != "--acls"]
#: The proof: two readings of the image by GNU tar with the unpack's own options, writing
#: nothing, each listing every header in a form read back exactly (C-quoted names, the block
#: each starts at, zero blocks and the end). --extract --to-stdout (the data to /dev/null)
#: reads regular and sparse files' data as the unpack does (a sparse map that claims more
#: data than the member holds makes it read on into the next members); --diff against an
#: empty directory reads on from the block after a symlink, hard link, device node or FIFO
#: as the unpack does (--list and --to-stdout skip the data such a member claims in its size
#: field or a pax record). The two listings must be the same: then the unpack reads the very
#: members they list.
LISTING = ["--file=-", "--verbose", "--verbose", "--block-number", "--full-time",
           "--quoting-style=c", *EXTRACT]
PROVE_DATA = ["tar", "--extract", "--to-stdout", *LISTING]
PROVE_LINKS = ["tar", "--diff", *LISTING]


#: where the store's GNU tar writes its listing of what it archives (a directory of the host,
#: bound into the sandbox at DEST): in the form of the proof's, read by shape_of_index()
INDEXED = [f"--index-file={sandbox.DEST}/list", "--verbose", "--verbose", "--block-number",
           "--full-time", "--quoting-style=c"]
#: a listing line shorter than this holds no name or symlink target near a limit (fits)
LONG_LINE = 1000


class TarFormat(StreamFormat):
    #: the shape of what the last write() archived (shape_of_index), recorded with the image
    shape: Optional[Dict[str, int]] = None

    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        argv: List[str] = ["tar", "--create", "--file=-", f"--directory={sandbox.SLOT}", *CREATE,
                           *INDEXED]
        if list(paths) == ["."]:
            argv += ["--anchored", "--exclude=./lost+found"]
        argv += ["--", *paths]
        # the listing of every path of the guest: removed by the next run if this one is killed
        with scratch.directory("index", memory=True) as index:
            stages: List[List[str]] = [sandbox.command(
                argv, [sandbox.Bind(src_root, sandbox.SLOT),
                       sandbox.Bind(index, sandbox.DEST, writable=True)],
                caps=sandbox.READ_XATTRS)]
            if self.compression:
                stages.append(compressor(self.compression))
            digest = process.pipeline(stages, stdout_path=dest, checksum=True)
            with open(os.path.join(index, "list"), "rb") as fh:
                self.shape = shape_of_index(fh)
        return digest

    def unpack_tools(self) -> List[str]:
        return [*super().unpack_tools(), "tar"]

    def unpack(self, image: str, staging: str, acl_records: bool = True) -> None:
        flags = EXTRACT if acl_records or has_acl(staging) else EXTRACT_NO_ACL_RECORDS
        untar = sandbox.command(
            ["tar", "--extract", "--file=-", f"--directory={sandbox.DEST}", *flags],
            [sandbox.Bind(staging, sandbox.DEST, writable=True)], caps=sandbox.UNPACK_XATTRS)
        if self.compression:
            process.pipeline([decompressor(self.compression), untar], stdin_path=image)
        else:
            process.pipeline([untar], stdin_path=image)

    def read_structure(self, image: str) -> Summary:
        return prove(image, self.compression)


def shape_of_index(lines: IO[bytes]) -> Optional[Dict[str, int]]:
    """What a restore of the archive must fit (vmim.archive.fits), from the store's own GNU tar
    listing of it: the inodes it makes, the most names of one inode, the longest symlink
    target, the bytes of file data (as the proof's Listing counts them, from the blocks between
    members: not a sparse file's holes, nor the last file's data). A name GNU tar could not
    unpack (longer than PATH_MAX: a guest tree deeper than that, which GNU tar archives through
    directory descriptors) is refused here, while the store can still say so (StateError,
    nothing stored). Only long lines are read whole: a short one holds no name near a limit
    (1.1 µs a line against 20 for the proof's Listing). None when a line is not what INDEXED
    makes GNU tar write."""
    inodes, longest_symlink, data = 0, 0, 0
    names_of: Dict[str, int] = {}
    start, size = 0, 0  # the block and size of the last file with data
    try:
        for raw in lines:
            fields = raw.split(None, 5)  # block N: MODE OWNER SIZE the rest
            if fields[0] != b"block":
                return None
            block = int(fields[1][:-1])
            if size:  # as Listing._block: its data lies before this member
                data += _data_of(size, max(0, block - start - 1) * BLOCK)
                size = 0
            letter = fields[2][:1]
            if letter in (b"-", b"C"):
                start, size = block, int(fields[4])
            if letter != b"h":
                if not (letter == b"d" and fields[5].endswith(b' "./"\n')):
                    inodes += 1  # not the root ("./"): the directory it is unpacked into
                if len(raw) < LONG_LINE:
                    continue  # no name, and no symlink target, near a limit
            at = raw.find(b": ") + 2
            line = raw.rstrip(b"\n").decode("ascii", "backslashreplace")
            rest = line[at:]
            name, after = _quoted(rest, rest.index('"'))
            if letter == b"h":
                target, _ = _quoted(rest, after + len(" link to "))
                names_of[target] = names_of.get(target, 1) + 1
            elif letter == b"l":
                target, _ = _quoted(rest, after + len(" -> "))
                longest_symlink = max(longest_symlink, len(target.encode("utf-8",
                                                                         "surrogateescape")))
            _check_length(name, "name")
    except UnsafeMember as exc:
        raise StateError(f"{exc}: a tar image of this tree could not be restored; nothing was "
                         "stored") from None
    except (_Unreadable, ValueError, IndexError):
        return None
    # the last file's data is not counted: no member follows to bound it, and its size would
    # count the holes of a sparse file (a lower bound, as the proof's, never refuses a fit)
    return {"inodes": inodes, "most_links": max(names_of.values(), default=1),
            "longest_symlink": longest_symlink, "data": data}


def has_acl(path: str) -> bool:
    """Whether directory path has a POSIX ACL (of its own or as a default for what is made
    in it): then GNU tar's --acls must give every member the ACL of its mode, as it does, or
    members would keep what they inherit."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return any(n.startswith("system.posix_acl_") for n in names)


BLOCK = 512


def prove(image: str, compression: Optional[str]) -> Summary:
    """GNU tar reads every header of image (decompressed on the way, once) as the unpack
    would, writing nothing; its listing goes through the layout check. CorruptArchive when GNU
    tar refuses the archive or its end-of-archive marker is missing, UnsafeMember for what the
    unpack onto a filesystem would refuse, CommandError when the decompressor fails."""
    listing = Listing()
    data = _Echo()
    def sandboxed(argv: Sequence[str], empty: str) -> List[str]:
        """GNU tar reading an untrusted archive sees no host path and keeps no capability:
        only an empty directory, read-only."""
        return sandbox.command(argv, [sandbox.Bind(empty, sandbox.DEST)], caps=sandbox.NONE)

    try:
        with scratch.directory("proof") as empty:  # what --diff compares with: nothing
            process.fan_out(image, decompressor(compression) if compression else None, [
                process.Sink(sandboxed(PROVE_DATA, empty), data.read, read="stderr"),
                # --diff exits 1 for "differs": nothing is there to compare with
                process.Sink(sandboxed([*PROVE_LINKS, f"--directory={sandbox.DEST}"], empty),
                             listing.read, ok_codes=(0, 1)),
            ])
    except CommandError as exc:
        if exc.argv[0] != "tar":
            raise
        process.check_cancelled()  # a signal stopped GNU tar: say that, not this
        said = exc.stderr_tail if exc.argv[:2] == PROVE_LINKS[:2] else " ".join(data.said)
        raise CorruptArchive(refusal(said)) from None
    if (data.lines, data.digest.digest()) != (listing.lines, listing.digest.digest()):
        raise CorruptArchive("GNU tar would unpack other members than it lists (a symlink, hard "
                             "link, device node or FIFO that claims data, or a sparse map that "
                             "does not match the data there)")
    return listing.summary()


class _Echo:
    """The listing that --extract --to-stdout writes on stderr among its messages: only its
    digest is kept, to compare with the listing --diff writes, and the messages."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.lines = 0
        self.said: List[str] = []

    def read(self, err: IO[bytes]) -> None:
        for raw in err:
            if raw.startswith(b"block "):
                self.digest.update(raw)
                self.lines += 1
            elif len(self.said) < 20:
                self.said.append(raw.decode("utf-8", "replace").strip())


def refusal(stderr: str) -> str:
    """What GNU tar said (its messages on one line, as CommandError keeps them), as the reason
    an image cannot be restored."""
    said = [f"tar: {m.strip()}" for m in stderr.split("tar: ") if m.strip() and
            not any(n in m for n in _NOISE)]
    shown = "; ".join(said[:3]) or "no message"
    if any("Unexpected EOF" in line for line in said):
        return f"the tar archive ends early, inside a member (truncated?): {shown}"
    return f"GNU tar refuses it: {shown}"


#: what GNU tar says on the way that is not why it failed (--diff finds nothing to compare
#: with; --to-stdout cannot truncate /dev/null)
_NOISE = ("Exiting with failure status", "not recoverable", "Warning: Cannot stat",
          "Warning: Cannot readlink", "Warning: Cannot truncate", "Removing leading",
          "Substituting `.'")

_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34,
            "?": 63, "'": 39}


def unquote_c(text: str) -> str:
    """A name as GNU tar's --quoting-style=c shows it (without its quotes), back to the name
    (bytes that are not UTF-8 as surrogate escapes, as everywhere in vmim)."""
    if "\\" not in text:
        return text  # printable ASCII as it is: most names
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("ascii")
            i += 1
        elif text[i + 1:i + 2].isdigit():
            out.append(int(text[i + 1:i + 4], 8))
            i += 4
        elif text[i + 1:i + 2] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            raise _Unreadable(text)
    return out.decode("utf-8", "surrogateescape")


#: a C-quoted string: its text between the quotes, escapes included
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _quoted(line: str, at: int) -> Tuple[str, int]:
    """The C-quoted string starting at line[at] (a double quote): (its text, the index after)."""
    m = _QUOTED.match(line, at)
    if m is None:
        raise _Unreadable(line)
    return unquote_c(m.group(1)), m.end()


class _Unreadable(Exception):
    """A line of GNU tar's listing that is not what LISTING makes it write."""


_LINE = re.compile(r"block (\d+): (\*\* (?:Block of NULs|End of File) \*\*|\S{10}.*)")
#: the first letter of a member's mode in GNU tar's listing -> what the unpack makes of it
#: (regular files, contiguous files, sparse files and unknown types are unpacked as files)
_KINDS = {"d": "d", "l": "l", "-": "f", "c": "f", "b": "f", "p": "f", "s": "f", "C": "f",
          "?": "f"}


class Listing:
    """GNU tar's verbose listing (LISTING), line by line, into a Layout and a Summary."""

    def __init__(self) -> None:
        self.layout = Layout("tar member", rmdir_empty=True)
        #: symlinks GNU tar makes only at the end (absolute or with ".."), a placeholder file
        #: meanwhile: a member that takes such a name is dropped or fails then, depending on
        #: whether its inode got the placeholder's number
        self.delayed: Set[Tuple[str, ...]] = set()
        self.members = 0
        self.needs = 0
        self.ended = False  # the last thing before the end of the stream was a zero block
        self.pending: Optional[Tuple[int, int]] = None  # (block, size) of the last file
        self.unread = ""  # the first line not understood (GNU tar failing half-way writes one)
        #: a member with an ACL record: GNU tar shows "+" after its mode (with --acls)
        self.acl_records = False
        self.digest = hashlib.sha256()  # of every line, to compare with _Echo's
        self.lines = 0
        self.longest_symlink = 0
        self.largest_file = 0

    def read(self, out: IO[bytes]) -> None:
        for raw in out:
            if raw.startswith(b'"'):
                continue  # what --diff found different: "NAME": ... (C-quoted, so never a
                # line of its own that starts otherwise)
            self.digest.update(raw)
            self.lines += 1
            line = raw.rstrip(b"\n").decode("ascii", "backslashreplace")
            if self.unread:
                continue  # GNU tar's own exit status will say why; else summary() refuses
            try:
                self.line(line)
            except _Unreadable:
                self.unread = line

    def _block(self, block: int) -> None:
        """The next header starts at block: the last file's data lies before it."""
        if self.pending is not None:
            start, size = self.pending
            self.needs += _data_of(size, max(0, block - start - 1) * BLOCK)
            self.pending = None

    def line(self, line: str) -> None:
        m = _LINE.fullmatch(line)
        if not m:
            raise _Unreadable(line)
        block, rest = int(m.group(1)), m.group(2)
        if rest == "** Block of NULs **":
            self._block(block)
            self.ended = True
            return
        if rest == "** End of File **":
            self._block(block)
            return
        block -= 1  # --diff numbers a member by the block after its header
        self._block(block)
        self.ended = False
        quote = rest.find('"')
        fields = rest[:quote].split()
        if quote < 0 or len(fields) < 3:
            raise _Unreadable(line)
        letter = fields[0][0]
        if fields[0][10:11] == "+":
            self.acl_records = True
        name, after = _quoted(rest, quote)
        _check_name(name, "name")  # GNU tar checks it first, whatever the type
        _check_length(name, "name")
        if letter == "V":  # a volume label: not unpacked
            return
        if Layout.parts(name) in self.delayed:
            raise UnsafeMember(f"tar member {name!r} takes the name of a symlink GNU tar makes "
                               "only at the end of the unpack (it would fail, or drop it)")
        if letter == "M":
            raise CorruptArchive(f"tar member {name!r} is continued from another volume (a "
                                 "multi-volume archive): it does not unpack on its own")
        self.members += 1
        if letter == "h":
            if not rest.startswith(' link to "', after):
                raise _Unreadable(line)
            target, _ = _quoted(rest, after + len(" link to "))
            _check_name(target, "hard link target")
            _check_length(target, "hard link target")
            self.layout.link(name, target, kinds="fl")
            return
        kind = _KINDS.get(letter)
        if kind is None:
            raise CorruptArchive(f"tar member {name!r} is of a type the unpack does not know "
                                 f"({letter!r} in GNU tar's listing)")
        size = fields[2]
        if letter == "C" and name.endswith("/"):
            kind = "d"  # as a regular file's, a name ending in "/" makes it a directory
        if letter == "l":
            if not rest.startswith(' -> "', after):
                raise _Unreadable(line)
            target, _ = _quoted(rest, after + len(" -> "))
            if not target:
                raise UnsafeMember(f"tar member {name!r} is a symlink to nothing (GNU tar "
                                   "cannot make it)")
            length = len(target.encode("utf-8", "surrogateescape"))
            fits.symlink_ok("tar member", name, length)
            self.longest_symlink = max(self.longest_symlink, length)
            if target.startswith("/") or ".." in target.split("/"):
                self.delayed.add(Layout.parts(name))
        if letter in "cb":
            major, _, minor = size.partition(",")
            if not (major.isdigit() and minor.isdigit()):
                raise _Unreadable(line)
            fits.device_ok("tar member", name, int(major), int(minor))
        self.layout.add(name, kind)
        if letter in "-C?" and size.isdigit():
            self.pending = (block, int(size))
            self.largest_file = max(self.largest_file, int(size))

    def summary(self) -> Summary:
        if self.unread:
            raise CorruptArchive(f"cannot read GNU tar's listing of it: {self.unread!r}")
        if not self.ended:
            raise CorruptArchive("tar archive ends without its end-of-archive marker "
                                 "(truncated?)" if self.members else "empty tar archive")
        lay = self.layout
        return Summary(self.members, self.needs, self.acl_records, inodes=lay.inodes,
                       longest_component=lay.longest_component,
                       longest_symlink=self.longest_symlink, most_links=lay.most_links,
                       largest_file=self.largest_file)


def _data_of(size: int, span: int) -> int:
    """The bytes of a file's data the unpack writes, as a lower bound, from its size and the
    bytes between its header and the next member's (its data, and extended headers and a
    sparse map around it): its size when they hold it; else the file is sparse (its holes are
    not stored) and what the span holds beside its data is not known: 0."""
    return size if size <= span else 0


def _check_name(name: str, what: str) -> None:
    if ".." in name.split("/"):
        raise UnsafeMember(f"tar member {what} {name!r} contains '..' (GNU tar would refuse it)")


def _check_length(name: str, what: str) -> None:
    """GNU tar passes a member's whole name to open, mkdir, link...: PATH_MAX bounds it."""
    fits.name_ok(f"tar member {what}", name, len(name.encode("utf-8", "surrogateescape")),
                 "GNU tar cannot unpack")
