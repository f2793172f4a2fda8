"""Slot disks: strategies that map a slot's disk to the device holding its root filesystem.

A strategy is chosen from `STRATEGIES` by the slot's store_type. Each one maps the disk
(registering the undo on an ExitStack, so a failure later releases it), and finds and
undoes mappings of that disk from live system state, so a release works after a crash.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

from vmim import process
from vmim.config import Slot
from vmim.disk import hold as hold_mod
from vmim.errors import CommandError, ConfigError, StateError

#: how every slot's filesystem is mounted while the tool works in it
SLOT_OPTIONS = ("nodev", "nosuid")

#: Filesystems vmimagemanager mounts as a slot's root.
SUPPORTED_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs")


@dataclass(frozen=True)
class Filesystem:
    type: str
    uuid: str
    label: str

    @property
    def mount_options(self) -> List[str]:
        # nodev, nosuid: the guest's device nodes (and what an image or insert creates) cannot
        # be opened on the host, its setuid programs do not run with the host's privileges.
        # Clones of one image share a UUID; XFS refuses a second one without nouuid.
        return [*SLOT_OPTIONS, *(["nouuid"] if self.type == "xfs" else [])]


def probe_filesystem(device: str, what: str) -> Filesystem:
    """The filesystem on device, by its superblock (blkid); StateError when none is found."""
    try:
        res = process.run(["blkid", "--probe", "--output", "export", "--", device], capture=True,
                          ok_codes=(0, 2))
    except CommandError as exc:
        raise StateError(f"{what}: cannot read a filesystem signature: {exc.stderr_tail}") from None
    # export format escapes a value's shell-special characters (a space) with a backslash
    values = {k: re.sub(r"\\(.)", r"\1", v) for k, v in
              (line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)}
    fstype = values.get("TYPE", "")
    if not fstype and values.get("PTTYPE"):
        raise StateError(f"{what}: holds a partition table ({values['PTTYPE']}), not a "
                         "filesystem: name such a disk with HostDisk and partition = N (the "
                         "partition holding the root filesystem), not with root")
    if not fstype:
        raise StateError(f"{what}: no filesystem found (unknown or corrupt); "
                         f"expected one of {', '.join(SUPPORTED_FILESYSTEMS)}")
    if fstype not in SUPPORTED_FILESYSTEMS:
        raise StateError(f"{what}: holds a '{fstype}' filesystem, not a root filesystem "
                         f"vmimagemanager mounts ({', '.join(SUPPORTED_FILESYSTEMS)})")
    return Filesystem(fstype, values.get("UUID", ""), values.get("LABEL", ""))


def device_size(device: str) -> int:
    """The size in bytes of a block device or a file (the end of what it holds)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def missing_disk(slot: Slot) -> Optional[str]:
    """"HostDisk '/x.img' does not exist" when the slot's disk file or device is not there (a
    logical volume is looked for by its strategy when mapping: not here)."""
    if not slot.disk or slot.store_type == "lvm":
        return None
    if os.path.lexists(slot.disk):
        return None
    return f"{'HostDisk' if slot.hostdisk else 'root'} '{slot.disk}' does not exist"


def check_exists(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StateError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise StateError(f"{what} '{path}': {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise StateError(f"{what} '{path}' is neither a disk image file nor a block device")
    return st


class SlotDisk:
    """Base class of the disk strategies."""

    def __init__(self, slot: Slot):
        self.slot = slot

    @property
    def source(self) -> str:
        """The file or block device holding the slot's disk."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.source

    def hold(self, stack: contextlib.ExitStack) -> Optional[hold_mod.DiskHold]:
        """Hold the disk as QEMU does while it is mapped (vmim.disk.hold): a domain started
        meanwhile fails, and a disk some QEMU holds is refused (exit 4). The hold goes on
        stack; it is returned so that a run leaving the slot mounted can hand it on."""
        if not os.path.exists(self.source):
            return None  # map() says what is missing, as each strategy knows it
        return stack.enter_context(hold_mod.hold_disk(self.source, "disk"))

    def check_free(self) -> None:
        """Refuse (exit 4) a disk another process holds as QEMU does (vmim.disk.hold), except
        this tool's own holder of a slot left mounted."""
        if os.path.exists(self.source):
            hold_mod.check_free(self.source, "disk", ignore=lambda h: h.ours)

    def map(self, stack: contextlib.ExitStack) -> str:
        """Map the disk; return the device holding the root filesystem. Undo goes on stack."""
        raise NotImplementedError

    def mapped_devices(self) -> List[str]:
        """Devices that map this disk now (live state): the ones a mount could come from."""
        raise NotImplementedError

    def unmap_all(self) -> List[str]:
        """Undo every mapping of this disk found in live state; return what was undone."""
        raise NotImplementedError


def for_slot(slot: Slot) -> SlotDisk:
    from vmim.disk import kpartx, lvm, partition, qcow2

    strategies: Dict[str, Type[SlotDisk]] = {
        "partition": partition.PartitionDisk,
        "kpartx": kpartx.KpartxDisk,
        "lvm": lvm.LvmDisk,
        "qcow2": qcow2.Qcow2Disk,
    }
    if slot.store_type is None:
        raise ConfigError(f"box '{slot.name}' ([{slot.section}]) has no disk: set HostDisk "
                          "(and partition, for a disk with a partition table) or root")
    return strategies[slot.store_type](slot)  # the config admits only these store types
