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
import logging
import os
import stat
from typing import Dict, List, Optional, Union

from vmim import process
from vmim.archive import detect
from vmim.config import Config, Slot
from vmim.disk import SlotDisk, check_exists, fuse, hold
from vmim.disk.kpartx import PartitionOf
from vmim.disk.partition import WholeDevice
from vmim.errors import CommandError, StateError
from vmim.paths import is_under

log = logging.getLogger(__name__)


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
        self.check_free()
        return None

    def check_free(self) -> None:
        if os.path.exists(self.source):
            ours = set(fuse.daemon_pids(self._export()))  # its export, a killed run's too
            hold.check_free(self.source, "qcow2 disk", ignore=lambda h: h.pid in ours)

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


#: Formats a disk image in the store, or any image below one, may have: neither names a host file
#: through an option of its own (vmdk extents, luks key files, ...), and qcow2's names are checked.
CHAIN_FORMATS = ("qcow2", "raw")
#: How many backing files deep a chain may go.
MAX_CHAIN = 16


def image_info(path: str, fmt: Optional[str] = None) -> dict:
    """`qemu-img info` of one image file. It opens that file only: none of the files it names
    (no --backing-chain; qemu-img info opens the image without its backing file and without
    I/O, so not its data file either), and -U takes no lock (works while a VM runs)."""
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    res = process.run([*argv, os.path.abspath(path)], capture=True)
    data = json.loads(res.stdout)
    if not isinstance(data, dict):
        raise StateError(f"qemu-img info of '{path}' says nothing usable")
    return data


def _has_protocol(name: str) -> bool:
    """QEMU's path_has_protocol(): a ':' before the first '/' makes a name a protocol
    (nbd:, http:, file:, json:...) rather than a path."""
    return ":" in name.split("/", 1)[0]


def _named_file(image: str, name: str, kind: str, store: Optional[str], what: str) -> str:
    """The real path of a file an image names (its backing file or data file), as QEMU finds
    it (a relative name is relative to the image's directory). StateError (exit 4) unless it
    is a plain path to a regular file, inside `store` when one is given."""
    if name.startswith("json:") or _has_protocol(name):
        raise StateError(f"{what}: its {kind} is '{name}', a QEMU protocol or json: name, not "
                         "a file: refused (a disk image may only stand on files in the image "
                         "store)")
    path = name if os.path.isabs(name) else os.path.join(os.path.dirname(image), name)
    real = os.path.realpath(path)
    if store is not None and not is_under(real, store):
        shown = name if real == os.path.normpath(path) else f"{name} -> {real}"
        raise StateError(f"{what}: its {kind} '{shown}' is outside the image store {store}: "
                         "refused (a disk image may only stand on images in the store)")
    try:
        st = os.stat(real)
    except OSError as exc:
        raise StateError(f"{what}: its {kind} '{name}' cannot be used: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"{what}: its {kind} '{name}' ({real}) is not a regular file: refused")
    return real


def checked_chain(path: str, store: Optional[str], what: str) -> List[str]:
    """Walk a disk image's chain one level at a time, checking each level's names before
    anything opens them: every backing file and data file must be a regular file inside
    `store` (real path: no symlink or ../ escape), named by a plain path (no json: or protocol),
    of an explicit or probed format in CHAIN_FORMATS. Returns the real paths below path;
    StateError (exit 4) naming the image and the offending name otherwise.

    `store` None checks the names only (a slot's own disk, which the admin made)."""
    store = os.path.realpath(store) if store is not None else None
    top = os.path.abspath(path)
    current = top
    seen = {os.path.realpath(current)}
    below: List[str] = []
    fmt: Optional[str] = None
    for _ in range(MAX_CHAIN + 1):
        info = image_info(current, fmt)
        found = info.get("format")
        here = what if current == top else f"{what}, through '{current}'"
        if found not in CHAIN_FORMATS:
            raise StateError(f"{here}: a '{found}' image, not one of "
                             f"{', '.join(CHAIN_FORMATS)}: refused")
        data = (info.get("format-specific") or {}).get("data") or {}
        data_file = data.get("data-file")
        if data_file is not None:
            if not (os.path.isabs(data_file) or data_file.startswith("json:") or
                    _has_protocol(data_file)):
                raise StateError(f"{here}: its data file '{data_file}' is relative (where QEMU "
                                 "looks for it depends on its working directory): refused")
            _named_file(current, data_file, "data file", store, here)
        backing = info.get("backing-filename")
        if not backing:
            return below
        real = _named_file(current, backing, "backing file", store, here)
        if real in seen:
            raise StateError(f"{here}: its backing chain loops back to '{real}': refused")
        fmt = info.get("backing-filename-format")
        if fmt is not None and fmt not in CHAIN_FORMATS:
            raise StateError(f"{here}: its backing file '{backing}' is declared '{fmt}', not "
                             f"one of {', '.join(CHAIN_FORMATS)}: refused")
        below.append(real)
        seen.add(real)
        current = real
    raise StateError(f"{what}: its backing chain is deeper than {MAX_CHAIN} images: refused")


def backing_files(path: str) -> List[str]:
    """Every image below path in its backing chain, as absolute real paths (names checked)."""
    return checked_chain(path, None, f"disk '{path}'")


def bases_in_use(cfg: Config) -> Dict[str, List[str]]:
    """Base image (real path) → the slots whose qcow2 overlays stand on it."""
    users: Dict[str, List[str]] = {}
    for slot in cfg.slots:
        if slot.store_type != "qcow2" or not slot.hostdisk or not os.path.exists(slot.hostdisk):
            continue
        try:
            for base in backing_files(slot.hostdisk):
                users.setdefault(base, []).append(slot.name)
        except (CommandError, StateError) as exc:
            log.warning("box %s: cannot tell which images its disk stands on: %s", slot.name,
                        exc)
            continue
    return users


def current_base(slot: Slot) -> str:
    """The image directly below a qcow2 slot's overlay, or ''."""
    if slot.store_type != "qcow2" or not slot.hostdisk or not os.path.exists(slot.hostdisk):
        return ""
    try:
        info = image_info(slot.hostdisk)
    except (CommandError, StateError, ValueError):
        return ""
    return str(info.get("full-backing-filename") or info.get("backing-filename") or "")


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


def convert(src: str, dest: str, out_format: str, *, compress: bool = False,
            src_format: Optional[str] = None) -> None:
    """qemu-img convert: zeros become holes (raw) or unallocated clusters (qcow2). The source's
    format is given when it is known (never probed again)."""
    argv = ["qemu-img", "convert", *(["-f", src_format] if src_format else []), "-O", out_format]
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
