"""tar streams, compressed with gzip (pigz), zstd, bzip2 or xz, or not at all.

Written and unpacked by GNU tar, in the sandbox (vmim.sandbox): it sees the slot (or the
staging directory) at a fixed name and nothing else of the host; the (de)compressor, which
reads or writes the image file in the store, runs outside. `check` reads a stream's structure,
every header to the end-of-archive marker, without writing anything: restore proves an image
with it before the slot is cleared (GNU tar itself lists an archive cut at a member boundary without a word).
"""

from __future__ import annotations

import tarfile
from typing import IO, Dict, List, Optional, Sequence

from vmim import process, sandbox
from vmim.archive import (
    CorruptArchive,
    Layout,
    StreamFormat,
    Summary,
    UnsafeMember,
    compressor,
    decompressor,
    skip,
)

# XFS shows its POSIX ACLs a second time as trusted.SGI_ACL_*: --acls carries them already.
XATTRS = ["--xattrs", "--xattrs-include=*", "--xattrs-exclude=trusted.SGI_ACL_*", "--acls"]
CREATE = ["--format=posix", "--numeric-owner", *XATTRS,
          "--sparse", "--one-file-system", "--pax-option=delete=atime,delete=ctime"]
EXTRACT = ["--numeric-owner", "--same-owner", "--preserve-permissions", *XATTRS]
#: a restore keeps the slot's own lost+found (its filesystem's): the archive's, at its root
#: only, is not unpacked (what `tar -C /mnt -cf x.tar .` makes holds one)
SKIP_LOST_FOUND = ["--anchored", "--exclude=./lost+found", "--exclude=lost+found"]


class TarFormat(StreamFormat):
    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        argv: List[str] = ["tar", "--create", "--file=-", f"--directory={sandbox.SLOT}", *CREATE]
        if list(paths) == ["."]:
            argv += ["--anchored", "--exclude=./lost+found"]
        argv += ["--", *paths]
        stages: List[List[str]] = [sandbox.command(argv, [sandbox.Bind(src_root, sandbox.SLOT)])]
        if self.compression:
            stages.append(compressor(self.compression))
        return process.pipeline(stages, stdout_path=dest, checksum=True)

    def unpack_tools(self) -> List[str]:
        return [*super().unpack_tools(), "tar"]

    def unpack(self, image: str, staging: str, restore: bool = False) -> None:
        untar = sandbox.command(
            ["tar", "--extract", "--file=-", f"--directory={sandbox.DEST}", *EXTRACT,
             *(SKIP_LOST_FOUND if restore else [])],
            [sandbox.Bind(staging, sandbox.DEST, writable=True)])
        if self.compression:
            process.pipeline([decompressor(self.compression), untar], stdin_path=image)
        else:
            process.pipeline([untar], stdin_path=image)

    def check(self, stream: IO[bytes]) -> Summary:
        return check(stream)


BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: member types whose data follows their header (tarfile's rule: regular files, contiguous
#: files, GNU sparse files; unknown types are skipped over as data too)
_NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
            tarfile.FIFOTYPE)


def _read_exact(stream: IO[bytes], n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CorruptArchive(f"tar archive ends early, inside {what} (truncated?)")
    return data


def _pax_records(data: bytes) -> Dict[str, str]:
    """The key=value records of a pax extended header ("LEN key=value\n" each)."""
    out: Dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptArchive("corrupt pax extended header") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise CorruptArchive("corrupt pax extended header")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _check_name(name: str, what: str) -> None:
    if ".." in name.split("/"):
        raise UnsafeMember(f"tar member {what} {name!r} contains '..' (GNU tar would refuse it)")


def check(stream: IO[bytes]) -> Summary:
    """Read every header of a tar stream (ustar, pax, GNU) to the end-of-archive marker (two
    zero blocks), skipping the data; CorruptArchive when it is cut short, a header's checksum
    is wrong or the marker is missing, UnsafeMember for a name GNU tar would refuse."""
    members = data = 0
    pending: Dict[str, str] = {}  # what pax or GNU long-name headers say of the next member
    layout = Layout("tar member")
    while True:
        buf = stream.read(BLOCK)
        if len(buf) < BLOCK:
            raise CorruptArchive("tar archive ends without its end-of-archive marker "
                                 "(truncated?)" if members or buf else "empty tar archive")
        if buf == ZERO_BLOCK:
            second = stream.read(BLOCK)
            if second not in (ZERO_BLOCK, b""):  # a lone zero block at the very end: GNU tar
                raise CorruptArchive("tar archive has a zero block in the middle (corrupt?)")
            return Summary(members, data)
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise CorruptArchive(f"corrupt tar header after {members} members ({exc})") from None
        size = info.size
        if size < 0:
            raise CorruptArchive(f"tar member {info.name!r} has a negative size")
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            records = _pax_records(_read_exact(stream, size, "a pax header"))
            skip(stream, -size % BLOCK)
            if info.type != tarfile.XGLTYPE:
                pending.update(records)
            continue
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            text = _read_exact(stream, size, "a long name").rstrip(b"\0")
            skip(stream, -size % BLOCK)
            key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
            pending[key] = text.decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.GNUTYPE_SPARSE:
            extended = buf[482]
            while extended:  # more sparse map blocks follow
                extended = _read_exact(stream, BLOCK, "a sparse map")[504]
        if info.type == b"M":  # GNU multi-volume continuation
            raise CorruptArchive("a multi-volume tar archive (a continued member): it does not "
                                 "unpack on its own")
        name = pending.get("GNU.sparse.name") or pending.get("path") or info.name
        _check_name(name, "name")
        if info.type == tarfile.LNKTYPE:
            target = pending.get("linkpath") or info.linkname
            _check_name(target, "hard link target")
            layout.link(name, target, kinds="fl")
        else:
            layout.add(name, "d" if info.type == tarfile.DIRTYPE else
                       "l" if info.type == tarfile.SYMTYPE else "f")
        if "size" in pending:
            if not pending["size"].isdigit():  # GNU tar refuses the rest too
                raise CorruptArchive(f"tar member {name!r} has a bad pax size "
                                     f"{pending['size']!r}")
            size = int(pending["size"])
        pending = {}
        if info.type not in _NO_DATA:
            skip(stream, size + -size % BLOCK)
            data += size
        members += 1
