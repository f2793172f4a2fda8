"""Archives built member by member for the tests (hostile ones included): tar through Python's
tarfile, cpio newc written header by header (GNU cpio cannot be made to write odd ones)."""

from __future__ import annotations

import io
import tarfile
from typing import Iterable, Tuple, Union

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


#: (ino, mode, nlink, name, body) of one newc entry
NewcEntry = Tuple[int, int, int, bytes, bytes]


def newc_of(entries: Iterable[NewcEntry]) -> bytes:
    """A newc stream of these entries and its trailer."""
    out = bytearray()
    for ino, mode, nlink, name, body in [*entries, (0, 0, 1, b"TRAILER!!!", b"")]:
        fields = [ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
        out += bytes(-len(out) % 4)
        out += body
        out += bytes(-len(out) % 4)
    return bytes(out)
