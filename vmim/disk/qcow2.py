"""Whole-disk images: qcow2 overlay slots and `--disk-image` stores and restores.

A `qcow2` slot's disk is an overlay on a base image in the image store: a restore makes a fresh
overlay (constant time, whatever the disk's size) and renames it over the slot's disk; a store
flattens the slot into a standalone image. A base that an overlay uses is never overwritten.
File-level actions (mount, trees, insert, extract) reach its filesystem through a
qemu-storage-daemon FUSE export (vmim.disk.fuse): no nbd needed.

Raw disk slots (image files) can store and restore the whole disk with `--disk-image`: a qcow2
image in the store (or raw, with `disk_image_format = "raw"`). Restoring a raw image onto a slot
on the same reflink-capable filesystem (xfs, btrfs) is a reflink copy: constant time.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional, Union

from vmim import process
from vmim.archive import detect
from vmim.config import Config, Slot
from vmim.disk import SlotDisk, check_exists, fuse, hold
from vmim.disk.kpartx import PartitionOf
from vmim.disk.partition import WholeDevice
from vmim.errors import CommandError


class Qcow2Disk(SlotDisk):
    """A qcow2 slot: whole-disk actions work on the image itself; file-level ones reach its
    filesystem through a qemu-storage-daemon FUSE export (vmim.disk.fuse) and a loop device,
    at partition N's offset when the slot names one."""

    @property
    def source(self) -> str:
        return self.slot.hostdisk or ""

    def describe(self) -> str:
        if self.slot.partition is not None:
            return f"{self.source} partition {self.slot.partition}"
        return self.source

    def _export(self) -> fuse.Export:
        return fuse.export_for(self.source)

    def _release_hint(self) -> str:
        return f"vmimagemanager -b {self.slot.name} --release"

    def hold(self, stack: contextlib.ExitStack) -> Optional[hold.DiskHold]:
        """The export daemon holds the image with QEMU's own locks once it runs (map), so a
        domain started after that fails; this only refuses (exit 4) an image another process
        holds now, naming it (an export a killed run left is undone before the map)."""
        check_exists(self.source, "HostDisk")
        ours = set(fuse.daemon_pids(self._export()))
        hold.check_free(self.source, "qcow2 disk", ignore=lambda h: h.pid in ours)
        return None

    def map(self, stack: contextlib.ExitStack) -> str:
        check_exists(self.source, "HostDisk")
        exp = self._export()
        fuse.start(exp)
        stack.callback(fuse.stop, exp, self._release_hint())
        inner: Union[WholeDevice, PartitionOf]
        if self.slot.partition is not None:
            inner = PartitionOf(exp.path, self.slot.partition, "loop", "qcow2 export")
        else:
            inner = WholeDevice(exp.path, "qcow2 export")
        return inner.map(stack)

    def mapped_devices(self) -> List[str]:
        return [lo.device for lo in fuse.loops_on(self._export())]

    def unmap_all(self) -> List[str]:
        return fuse.stop(self._export(), self._release_hint())


def is_disk_image(path: str, meta: Optional[dict]) -> bool:
    """Whether an image in the store is a whole disk (qcow2 or raw), not a tree or an archive."""
    if meta and meta.get("format") in ("qcow2", "raw"):
        return True  # a raw disk image has no magic of its own: the store recorded it
    return detect.detect(path).format in ("qcow2", "raw")


def info_chain(path: str) -> List[dict]:
    """`qemu-img info --backing-chain` of a disk image (shared lock: works while a VM runs)."""
    res = process.run(["qemu-img", "info", "--output=json", "--backing-chain", "--force-share",
                       path], capture=True)
    data = json.loads(res.stdout)
    return data if isinstance(data, list) else [data]


def backing_files(path: str) -> List[str]:
    """Every image below path in its backing chain, as absolute real paths."""
    out = []
    for entry in info_chain(path)[1:]:
        out.append(os.path.realpath(entry["filename"]))
    return out


def bases_in_use(cfg: Config) -> Dict[str, List[str]]:
    """Base image (real path) → the slots whose qcow2 overlays stand on it."""
    users: Dict[str, List[str]] = {}
    for slot in cfg.slots:
        if slot.store_type != "qcow2" or not slot.hostdisk or not os.path.exists(slot.hostdisk):
            continue
        try:
            for base in backing_files(slot.hostdisk):
                users.setdefault(base, []).append(slot.name)
        except CommandError:
            continue
    return users


def current_base(slot: Slot) -> str:
    """The image directly below a qcow2 slot's overlay, or ''."""
    if slot.store_type != "qcow2" or not slot.hostdisk or not os.path.exists(slot.hostdisk):
        return ""
    try:
        chain = info_chain(slot.hostdisk)
    except CommandError:
        return ""
    return chain[0].get("full-backing-filename") or chain[0].get("backing-filename") or ""


def make_overlay(base: str, disk: str) -> None:
    """Replace disk, atomically, with a fresh qcow2 overlay backed by base."""
    tmp = f"{disk}.vmim-tmp.{os.getpid()}"
    try:
        process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.abspath(base),
                     "-F", "qcow2", tmp])
        os.replace(tmp, disk)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def convert(src: str, dest: str, out_format: str, *, compress: bool = False) -> None:
    """qemu-img convert: zeros become holes (raw) or unallocated clusters (qcow2)."""
    argv = ["qemu-img", "convert", "-O", out_format]
    if compress and out_format == "qcow2":
        argv.append("-c")
    process.run([*argv, src, dest])


def copy_raw(src: str, dest: str) -> str:
    """Copy a raw image: a reflink where the filesystem can (constant time), else sparse."""
    try:
        process.run(["cp", "--reflink=always", "--", src, dest])
        return "reflink"
    except CommandError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
    process.run(["cp", "--sparse=always", "--", src, dest])
    return "sparse copy"
