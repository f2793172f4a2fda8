"""Format detection by content with python-magic, never by name.

A directory is an rsync tree. For a file, libmagic names the compression; the first
bytes of the decompressed stream tell tar from cpio. libmagic cannot look inside zstd
itself, so every compression is unpacked here and only the head is read.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from vmim import process
from vmim.errors import HostEnvironmentError

HEAD_BYTES = 64 * 1024

#: libmagic description prefix → compression
COMPRESSIONS = {
    "gzip compressed data": "gzip",
    "bzip2 compressed data": "bzip2",
    "zstandard compressed data": "zstd",
    "xz compressed data": "xz",
}
EXTENSIONS = {"gzip": "gz", "bzip2": "bz2", "zstd": "zst", "xz": "xz"}
#: (compression, container) → the format's name where it has a traditional one
NAMES = {("gzip", "tar"): "tgz", ("bzip2", "cpio"): "cpio.bz2", ("zstd", "tar"): "tar.zst"}

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Detected:
    format: str  # rsync, tgz, cpio.bz2, tar.zst, tar.bz2, cpio.gz, tar, cpio, qcow2, raw, unknown
    container: Optional[str]  # tree, tar, cpio, qcow2, raw
    compression: Optional[str]  # gzip, bzip2, zstd, xz
    description: str  # what libmagic said

    @property
    def known(self) -> bool:
        return self.format != UNKNOWN


_magic: Any = None


def _get_magic() -> Any:
    global _magic
    if _magic is None:
        try:
            import magic  # noqa: PLC0415 — deliberately lazy
        except ImportError as exc:
            raise HostEnvironmentError(
                f"the Python module 'magic' cannot be imported ({exc}); "
                "install python-magic and libmagic1"
            ) from None
        _magic = magic.Magic(mime=False)
    return _magic


#: what libmagic calls the cpio variants vmimagemanager does not read (it reads newc and crc)
OTHER_CPIO = {"pre-svr4 or odc": "odc", "cpio archive": "bin"}


def _container(description: str) -> Optional[str]:
    d = description.lower()
    if "tar archive" in d:
        return "tar"
    if "cpio archive" in d:
        return "cpio" if "(svr4 with" in d else "cpio-other"
    if d.startswith("qemu qcow") and not d.startswith("qemu qcow image (v1)"):
        return "qcow2"  # v2 and v3; QEMU's qcow (v1) is another format, never used
    if d.startswith("dos/mbr boot sector") or "partition table" in d or "filesystem data" in d \
            or d.startswith("btrfs filesystem"):
        return "raw"  # a disk or a filesystem image
    return None


def _head(path: str, compression: str) -> bytes:
    if compression == "zstd":
        return process.read_head(["zstd", "-dcq", "--", path], HEAD_BYTES)
    opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[compression]
    buf = bytearray()
    with opener(path, "rb") as fh:  # type: ignore[operator]
        try:
            while len(buf) < HEAD_BYTES:
                chunk = fh.read1(HEAD_BYTES - len(buf))
                if not chunk:
                    break
                buf += chunk
        except (OSError, EOFError, lzma.LZMAError, zlib.error):
            if not buf:
                raise  # a truncated stream still has a head; a wrong one has none
    return bytes(buf)


def _other_cpio(inner: str, outer: str = "") -> str:
    variant = next((v for k, v in OTHER_CPIO.items() if k in inner.lower()), "bin")
    return (f"a cpio archive in the {variant} variant{f' ({outer})' if outer else ''}, which "
            "vmimagemanager does not read: it reads newc (cpio -H newc)")


def recorded(fmt: Any) -> Optional[Detected]:
    """What an archive is, from the format name this tool recorded when it stored it (tgz,
    tar.zst, cpio.bz2, tar, cpio.gz ...); None for a name it does not know or a tree. Only for
    an image whose recorded digest matched: the digest proves the bytes are those it wrote in
    that format, so libmagic would only say it again."""
    names = {v: k for k, v in NAMES.items()}
    if not isinstance(fmt, str):
        return None
    if fmt in names:
        compression, container = names[fmt]
    elif fmt in ("tar", "cpio"):
        compression, container = None, fmt
    else:
        container, _, ext = fmt.partition(".")
        compression = next((c for c, e in EXTENSIONS.items() if e == ext), None)
        if container not in ("tar", "cpio") or compression is None or \
                (compression, container) in NAMES:
            return None
    return Detected(fmt, container, compression, f"{fmt}, as recorded when stored")


def detect(path: str) -> Detected:
    """What kind of image or insert `path` is."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        return Detected("rsync", "tree", None, "directory")
    m = _get_magic()
    description = m.from_file(real)
    first = description.split(", ")[0].lower()
    compression = next((c for prefix, c in COMPRESSIONS.items() if first.startswith(prefix)), None)
    if compression is None:
        container = _container(description)
        if container == "cpio-other":
            return Detected(UNKNOWN, None, None, _other_cpio(description))
        fmt = container if container in ("tar", "cpio", "qcow2", "raw") else UNKNOWN
        return Detected(fmt, container, None, description)
    try:
        head = _head(real, compression)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        return Detected(UNKNOWN, None, compression, f"{description} (unreadable: {exc})")
    if not head:
        return Detected(UNKNOWN, None, compression, f"{description} (empty or corrupt)")
    inner = m.from_buffer(head)
    container = _container(inner)
    if container == "cpio-other":
        return Detected(UNKNOWN, None, compression, _other_cpio(inner, description))
    if container not in ("tar", "cpio"):
        return Detected(UNKNOWN, None, compression, f"{inner} ({description})")
    fmt = NAMES.get((compression, container), f"{container}.{EXTENSIONS[compression]}")
    return Detected(fmt, container, compression, f"{inner} ({description})")
