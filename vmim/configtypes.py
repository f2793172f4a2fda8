"""The configuration's typed values: `Slot` (one libvirt domain and its disk) and `Config`
(the whole file, defaults filled in), with the section names of the current and legacy formats.
vmim.config reads a file into them; everything below the command line works on them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Mapping, Optional, Tuple

from vmim.keys import default
from vmim.words import StoreType

LOCAL_SECTION = "vmim.local"
SLOT_PREFIX = "vmim.vm."
LEGACY_SECTION = "VmImageManager"


#: the standby disk of a slot is mounted at its mount point with this suffix
STANDBY_MOUNT_SUFFIX = ".standby"


@dataclass(frozen=True)
class Slot:
    """One slot: a libvirt domain and the disk holding its root filesystem."""

    name: str
    section: str
    store_type: Optional[StoreType]  # a plain word given is taken as the StoreType it names
    mount: str
    hostdisk: Optional[str] = None
    partition: Optional[int] = None
    root: Optional[str] = None
    swap: Optional[str] = None
    lvm_volume_group: Optional[str] = None
    lvm_volume: Optional[str] = None
    mapper: str = default("mapper")
    vmimages: Optional[str] = None
    vminserts: Optional[str] = None
    vmextracts: Optional[str] = None
    mac: Tuple[str, ...] = ()
    bridge: Optional[str] = None
    memory: int = default("memory")
    vcpu: int = default("vcpu")
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    virt_type: str = default("virt_type")
    serial_log: Optional[str] = None
    hosttransform: Optional[str] = None
    timeout: int = default("timeout")
    clear: str = default("clear")
    disk_image_format: str = default("disk_image_format")
    qcow2_compress: bool = default("qcow2_compress")
    sourceimage: bool = default("sourceimage")
    enabled: bool = default("enabled")
    disksize: Optional[int] = None
    standby: Optional[str] = None  # the second disk --stage restores into (vmim.standby)
    #: a problem of the config that concerns this slot only (its mount point is another
    #: slot's): warned at load; any action on the slot's disk is refused with it (exit 3)
    conflict: Optional[str] = None

    def __post_init__(self) -> None:
        if self.store_type is not None:
            object.__setattr__(self, "store_type", StoreType(self.store_type))

    @property
    def disk(self) -> Optional[str]:
        """The file or device holding the slot's disk, as configured."""
        if self.store_type == "lvm" and not self.root and not self.hostdisk:
            return f"/dev/{self.lvm_volume_group}/{self.lvm_volume or self.name}"
        return self.hostdisk or self.root

    @property
    def standby_disk(self) -> Optional[str]:
        """The slot's second disk, that --stage restores into (vmim.standby): the `standby`
        key, else for a qcow2 slot the overlay NAME.standby.qcow2 beside HostDisk."""
        if self.standby:
            return self.standby
        if "/" in self.name:  # BOX/standby, the standby of a slot as a slot: none of its own
            return None
        if self.store_type == "qcow2" and self.hostdisk:
            stem = self.hostdisk[:-len(".qcow2")] if self.hostdisk.endswith(".qcow2") \
                else self.hostdisk
            return f"{stem}.standby.qcow2"
        return None

    @property
    def standby_mount(self) -> str:
        """Where the standby disk's filesystem is mounted while an image is staged into it."""
        return self.mount + STANDBY_MOUNT_SUFFIX

    def describe_disk(self) -> str:
        disk = self.disk
        if disk is None:
            return "-"
        if self.partition is not None and self.store_type in ("kpartx", "lvm"):
            return f"{disk} (partition {self.partition})"
        return disk


@dataclass(frozen=True)
class Config:
    path: str
    format: str  # "current" or "legacy"
    uri: str = default("uri")
    mount_prefix: str = default("mount_prefix")
    lockdir: str = default("lockdir")
    statedir: str = default("statedir")
    broker: Optional[str] = default("broker")
    broker_ca: Optional[str] = default("broker_ca")
    broker_cert: Optional[str] = default("broker_cert")
    broker_key: Optional[str] = default("broker_key")
    vmlist: Tuple[str, ...] = ()
    slots: Tuple[Slot, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    warnings: Tuple[str, ...] = ()

    def slot(self, name: str) -> Optional[Slot]:
        for s in self.slots:
            if s.name == name:
                return s
        return None

    @property
    def slot_names(self) -> List[str]:
        return [s.name for s in self.slots]

    def image_dirs(self) -> List[str]:
        return _unique([self.defaults.get("vmimages")] + [s.vmimages for s in self.slots])

    def insert_dirs(self) -> List[str]:
        dirs: List[Optional[str]] = [self.defaults.get("vminserts"), self.defaults.get("vmextracts")]
        for s in self.slots:
            dirs += [s.vminserts, s.vmextracts]
        return _unique(dirs)


def _unique(items: Iterable[Optional[str]]) -> List[str]:
    out: List[str] = []
    for i in items:
        if i and os.path.normpath(i) not in out:
            out.append(os.path.normpath(i))
    return out
