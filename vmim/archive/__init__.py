"""Archive formats: rsync trees and compressed tar/cpio streams, behind one interface.

A format writes a tree (or some directories of it) into a new image, unpacks an image into
an empty staging directory, and tests an image's integrity without unpacking it. Formats
are chosen by name for store and extract (`FORMATS`), and by what detection found for
restore and insert (`for_detected`).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from vmim.errors import StateError

if TYPE_CHECKING:
    from vmim.archive.detect import Detected

#: compression → (compressor argv, decompressor argv), preferring the parallel tools.
_TOOLS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "gzip": (("pigz", "-c"), ("gzip", "-c")),
    "bzip2": (("lbzip2", "-c"), ("bzip2", "-c")),
    "zstd": (("zstd", "-q", "-T0", "-c"),),
    "xz": (("xz", "-T0", "-c"),),
}
_DETOOLS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "gzip": (("pigz", "-dc"), ("gzip", "-dc")),
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


def tester(compression: str) -> List[str]:
    """argv that tests a compressed file's integrity (add the path)."""
    argv = decompressor(compression)
    return [argv[0], "-t"] + (["-q"] if argv[0] == "zstd" else [])


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

    def unpack(self, image: str, staging: str) -> None:
        """Unpack the image into the empty directory staging."""
        raise NotImplementedError

    def verify(self, image: str) -> None:
        """Raise StateError when the image is truncated or corrupt."""
        raise NotImplementedError

    def unpack_tools(self) -> List[str]:
        """The programs unpack() runs: checked before anything touches the slot."""
        raise NotImplementedError


class StreamFormat(Format):
    """An archive stream (tar or cpio), compressed or not."""

    def __init__(self, compression: Optional[str], name: str):
        self.compression = compression
        self.name = name

    def unpack_tools(self) -> List[str]:
        return [decompressor(self.compression)[0]] if self.compression else []

    def verify(self, image: str) -> None:
        """Decompress the whole stream to check it (used when no sha256 was recorded)."""
        if not self.compression:
            return
        from vmim import process
        from vmim.errors import CommandError

        try:
            process.run([*tester(self.compression), image])
        except CommandError as exc:
            raise StateError(f"image {image} is corrupt or truncated: {exc.stderr_tail}") from None


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
