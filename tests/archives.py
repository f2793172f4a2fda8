"""Archives built member by member for the tests (hostile ones included): tar through Python's
tarfile, cpio newc written header by header (GNU cpio cannot be made to write odd ones)."""

from __future__ import annotations

import io
import tarfile
from typing import Dict, Iterable, Optional, Tuple, Union

#: (name, kind, extra): kind "file" (extra: its bytes), "dir", "symlink" or "hardlink" (extra:
#: the target)
TarMember = Tuple[str, str, Union[bytes, str]]
_TYPES = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}


def tar_of(members: Iterable[TarMember], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind == "file":
                data = extra if isinstance(extra, bytes) else extra.encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = _TYPES[kind]
            info.linkname = extra if isinstance(extra, str) else extra.decode()
            tf.addfile(info)
    return buf.getvalue()


#: (ino, mode, nlink, name, body) of one newc entry, optionally (rdevmajor, rdevminor) last
NewcEntry = Union[Tuple[int, int, int, bytes, bytes], Tuple[int, int, int, bytes, bytes,
                                                             Tuple[int, int]]]


def newc_of(entries: Iterable[NewcEntry]) -> bytes:
    """A newc stream of these entries and its trailer."""
    out = bytearray()
    for entry in [*entries, (0, 0, 1, b"TRAILER!!!", b"")]:
        ino, mode, nlink, name, body = entry[:5]
        rdev = entry[5] if len(entry) > 5 else (0, 0)  # type: ignore[misc]
        fields = [ino, mode, 0, 0, nlink, 0, len(body), 0, 0, *rdev, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
        out += bytes(-len(out) % 4)
        out += body
        out += bytes(-len(out) % 4)
    return bytes(out)


#: (name, type, data, linkname, pax records) of one tar member, any type tarfile writes
TarEntry = Tuple[str, bytes, bytes, str, Dict[str, str]]


def tar_entries(entries: Iterable[TarEntry], fmt: int = tarfile.PAX_FORMAT,
                global_pax: Optional[Dict[str, str]] = None) -> bytes:
    """A tar of arbitrary members: any type, any pax records, a global pax header first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax or {}) as tf:
        for name, typ, data, linkname, pax in entries:
            info = tarfile.TarInfo(name)
            info.type = typ
            info.linkname = linkname
            info.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
            info.pax_headers = dict(pax)
            if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def tar_members_end(data: bytes) -> int:
    """Where a tar's end-of-archive marker starts: the data before its trailing zero blocks."""
    end = len(data)
    while end >= 512 and data[end - 512:end] == bytes(512):
        end -= 512
    return end


def fix_tar_checksum(header: bytes) -> bytes:
    """A 512-byte tar header with its checksum recomputed (after a test changed a field)."""
    h = bytearray(header)
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)
