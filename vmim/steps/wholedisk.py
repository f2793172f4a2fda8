"""Whole-disk images (qcow2 slots, --disk-image): store the disk as qcow2 or raw, restore one
over it (a new qcow2 overlay in constant time, or an atomic replace of a raw disk file)."""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from typing import Any, Dict, Iterator

from vmim import disk as disk_mod
from vmim import incomplete, process
from vmim import store as store_mod
from vmim.archive import detect
from vmim.config import Slot
from vmim.disk import hold, qcow2
from vmim.errors import CommandError, StateError
from vmim.paths import is_under
from vmim.progress import human_size
from vmim.recorder import StepResult
from vmim.steps import Box, Proven
from vmim.steps.mount import check_domain_off


class DiskImageFormat:
    """A whole-disk image in the store (qcow2 or raw): no archive checksum, qemu-img checks."""

    is_tree = False

    def __init__(self, name: str):
        self.name = name


def image_file_disk(slot: Slot) -> str:
    disk = slot.hostdisk or slot.root or ""
    if not os.path.isfile(disk):
        raise StateError(f"box '{slot.name}': --disk-image works on disk image files; "
                         f"'{disk}' is not one")
    return disk


def _convert_to(disk: str, out_format: str, compress: bool, src_format: str, tmp: str,
                _link: str) -> None:
    qcow2.convert(disk, tmp, out_format, compress=compress, src_format=src_format)


def _copy_raw_to(disk: str, tmp: str, _link: str) -> None:
    qcow2.copy_raw(disk, tmp)


def store(box: Box, st: store_mod.ImageStore, name: str, rec: StepResult,
          meta: Dict[str, Any]) -> str:
    slot = box.need_slot()
    if slot.store_type == "qcow2":
        disk, fmt = slot.hostdisk or "", DiskImageFormat("qcow2")
        # what it stands on is copied into the image: plain files only (a base restored
        # from the store was checked then; the slot's first disk is the admin's)
        qcow2.checked_chain(disk, None, f"box '{slot.name}': disk '{disk}'")
    else:  # the plan released the disk first: the file must not change under the copy
        disk, fmt = image_file_disk(slot), DiskImageFormat(slot.disk_image_format)
    if fmt.name == "qcow2":
        # a raw slot's disk is the guest's to write: never probed (a qcow2 header it wrote
        # would name a host file)
        writer = functools.partial(_convert_to, disk, "qcow2", slot.qcow2_compress,
                                   "qcow2" if slot.store_type == "qcow2" else "raw")
        meta = st.write(name, fmt, writer, {**meta, "disk": disk})  # qemu-img locks it
    else:
        writer = functools.partial(_copy_raw_to, disk)
        with held_off(box, slot, disk):  # cp does not lock
            meta = st.write(name, fmt, writer, {**meta, "disk": disk})
    rec.details.update(image=name, format=fmt.name, bytes=meta["size"])
    return f"stored the whole disk as {st.path(name)} ({fmt.name}, {human_size(meta['size'])})"


def usable(slot: Slot, disk_image: bool, st: store_mod.ImageStore, name: str) -> str:
    """The format of a whole-disk image this slot can take (StateError, exit 4, otherwise)."""
    path = st.find(name)
    meta = st.metadata(name)
    # A raw disk image has no magic of its own: what the store recorded says what it is.
    fmt_name = meta["format"] if meta and meta.get("format") in ("qcow2", "raw") else \
        detect.detect(path).format
    wanted = ("qcow2",) if slot.store_type == "qcow2" else ("qcow2", "raw")
    if fmt_name not in wanted:
        raise StateError(f"image '{name}' is {fmt_name}, not a disk image this slot can "
                         f"use ({' or '.join(wanted)})")
    if slot.store_type != "qcow2":
        image_file_disk(slot)  # --disk-image writes over a disk file
    check_image(st, name, fmt_name)
    return fmt_name


def check_image(st: store_mod.ImageStore, name: str, fmt_name: str) -> None:
    """A whole-disk image may only name files in the image store: its backing files and data
    files, level by level, before anything opens them (StateError, exit 4, naming the image and
    the offending name). Whatever it names would otherwise become part of a slot's disk: read
    by the guest, and a data file written by it."""
    path = st.find(name)
    what = f"image '{name}'"
    store = os.path.realpath(st.directory)
    real = os.path.realpath(path)
    if not is_under(real, store) or not os.path.isfile(real):
        raise StateError(f"{what}: '{path}' leads to '{real}', not a file in the image store "
                         f"{store}: refused")
    if fmt_name == "qcow2":
        qcow2.checked_chain(path, store, what)


def verify(box: Box, st: store_mod.ImageStore, name: str) -> Proven:
    path = st.find(name)
    fmt_name = usable(box.need_slot(), box.req.disk_image, st, name)  # its chain checked
    if fmt_name == "qcow2":
        try:
            process.run(["qemu-img", "check", "-q", "-f", "qcow2", path])
        except CommandError as exc:
            raise StateError(f"image '{name}' is corrupt: {exc.stderr_tail}; the slot was "
                             "not touched") from None
    return Proven(path, DiskImageFormat(fmt_name))


@contextlib.contextmanager
def held_off(box: Box, slot: Slot, disk: str) -> Iterator[None]:
    """While a whole disk is copied or replaced: held as QEMU holds it (vmim.disk.hold), so a
    domain started meanwhile fails, and its domain checked shut off under the hold."""
    with contextlib.ExitStack() as stack:
        if os.path.exists(disk):  # a qcow2 slot's first overlay has nothing to hold yet
            stack.enter_context(hold.hold_disk(disk, "disk"))
        check_domain_off(box.hv, slot, disk_mod.for_slot(slot))
        yield


def restore(box: Box, name: str, proven: Proven, rec: StepResult) -> str:
    slot = box.need_slot()
    path, fmt_name = proven.path, proven.fmt.name
    check_image(box.store("vmimages"), name, fmt_name)  # as verified: nothing changed since
    rec.details.update(image=name, format=fmt_name, bytes=os.path.getsize(path))
    if slot.store_type == "qcow2":
        with held_off(box, slot, slot.hostdisk or ""):  # the old overlay, until replaced
            qcow2.make_overlay(path, slot.hostdisk or "")
        incomplete.remove(box.cfg, slot)  # the whole disk was replaced at once
        return f"{name}: the slot's disk is a new qcow2 overlay on it"
    disk = image_file_disk(slot)  # released by the plan's step before this one
    with held_off(box, slot, disk):
        how = _write_over(path, fmt_name, disk)
    incomplete.remove(box.cfg, slot)
    return f"{name} ({fmt_name}) written over the whole disk ({how})"


def _write_over(path: str, fmt_name: str, disk: str) -> str:
    """Write image path over a raw disk file: a copy under a temporary name, then a rename."""
    tmp = f"{disk}.vmim-tmp.{os.getpid()}"
    try:
        if fmt_name == "raw":
            how = qcow2.copy_raw(path, tmp)
        else:
            qcow2.convert(path, tmp, "raw", src_format="qcow2")
            how = "converted to raw, sparse"
        os.chmod(tmp, stat.S_IMODE(os.stat(disk).st_mode))
        os.replace(tmp, disk)  # atomic: the old disk is intact until here
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return how
