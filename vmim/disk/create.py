"""A slot's disk made from its config alone: a file named by HostDisk or root that does not
exist yet, with `disksize` set, is created by the first action that needs it.

It is made under a temporary name beside its final one (sparse; an MBR partition table with
partition 1 when the slot names `partition = 1`; a filesystem), converted to qcow2 for a qcow2
slot, and linked into place only when complete: a creation that fails or is killed never
leaves a half-made disk under the slot's name. Only files are made, never block devices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Optional, Tuple

from vmim import process
from vmim.config import Slot
from vmim.disk import loop
from vmim.errors import StateError
from vmim.progress import human_size

log = logging.getLogger(__name__)

#: the filesystem a new disk gets when the image does not say which it came from
DEFAULT_FS = "ext4"
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "ext3": ["mkfs.ext3", "-q", "-F"],
        "ext2": ["mkfs.ext2", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}
#: where partition 1 of a new table starts (the usual 1 MiB alignment)
PARTITION_START = 1 << 20


def image_facts(slot: Slot, image: Optional[str]) -> Tuple[Optional[str], Optional[int]]:
    """(filesystem type, bytes of data) that the store recorded for image, where it did."""
    if image is None or not slot.vmimages:
        return None, None
    from vmim.store import ImageStore

    try:
        meta = ImageStore(slot.vmimages).metadata(image) or {}
    except Exception:  # an invalid name or store: the verify step says it
        return None, None
    fstype = meta.get("filesystem")
    used = meta.get("filesystem_used")
    return (fstype if isinstance(fstype, str) and fstype in MKFS else None,
            used if isinstance(used, int) else None)


def _what(slot: Slot) -> str:
    return "HostDisk" if slot.hostdisk else "root"


def refusal(slot: Slot, needs_bytes: Optional[int] = None) -> Optional[str]:
    """Why the slot's missing disk cannot be made (None: it can). Called only when the disk
    is missing; needs_bytes: the data of the image that will be restored into it, if known."""
    path = slot.disk or ""
    what = f"{_what(slot)} '{path}'"
    if slot.disksize is None:
        return (f"{what} does not exist; create it, or set disksize (e.g. disksize = \"20G\") "
                "in the slot's section to have vmimagemanager make it")
    if slot.store_type == "lvm" or path.startswith("/dev/"):
        return f"{what} does not exist; vmimagemanager makes disk files, never block devices"
    parent = os.path.dirname(path) or "/"
    if not os.path.isdir(parent):
        return f"{what} does not exist and cannot be made: directory {parent} does not exist"
    if slot.partition not in (None, 1):
        return (f"{what} does not exist; disksize makes a disk with one partition: set "
                "partition = 1, or make the disk yourself")
    if needs_bytes is not None and needs_bytes > usable_bytes(slot):
        return (f"{what} does not exist, and disksize ({human_size(slot.disksize)}) is smaller "
                f"than the image's data ({human_size(needs_bytes)}); set a larger disksize")
    return None


def usable_bytes(slot: Slot) -> int:
    size = slot.disksize or 0
    return size - PARTITION_START if slot.partition is not None else size


def describe(slot: Slot, fstype: Optional[str]) -> str:
    parts = [f"make {slot.disk}: a sparse {human_size(slot.disksize or 0)} "
             f"{'qcow2' if slot.store_type == 'qcow2' else 'raw'} file"]
    if slot.partition is not None:
        parts.append("an MBR partition table with partition 1")
    parts.append(f"an {fstype or DEFAULT_FS} filesystem")
    return ", ".join(parts)


def create(slot: Slot, fstype: Optional[str]) -> str:
    """Make the slot's disk (see the module's docstring); the disk must not exist."""
    path = slot.disk or ""
    why = refusal(slot)
    if why is not None:
        raise StateError(why)
    fstype = fstype or DEFAULT_FS
    if fstype not in MKFS:
        raise StateError(f"cannot make a {fstype} filesystem on a new disk (only "
                         f"{', '.join(MKFS)})")
    # Everything is made in a private directory beside the disk (mkdtemp: 0700, a new name):
    # no other user can plant a name the tools below would follow, whoever may write there.
    work = tempfile.mkdtemp(prefix=".vmim-new-disk.", dir=os.path.dirname(path) or "/")
    try:
        tmp = os.path.join(work, "raw")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, slot.disksize or 0)
        finally:
            os.close(fd)
        if slot.partition is not None:
            process.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", tmp],
                        input=f"label: dos\nstart={PARTITION_START // 512}, type=83\n")
        with contextlib.ExitStack() as stack:
            offset = PARTITION_START if slot.partition is not None else 0
            device = loop.attach(tmp, offset=offset, size=usable_bytes(slot))
            stack.callback(loop.detach, device)
            process.run([*MKFS[fstype], device])
        final = tmp
        if slot.store_type == "qcow2":
            final = os.path.join(work, "qcow2")
            process.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", tmp, final])
        os.link(final, path)  # never over a disk that appeared meanwhile
        _sync_dir(os.path.dirname(path) or "/")
    except FileExistsError:
        raise StateError(f"{_what(slot)} '{path}' appeared while it was being made; "
                         "nothing was replaced") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("made %s (%s, %s)", path, human_size(slot.disksize or 0), fstype)
    return describe(slot, fstype)


def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
