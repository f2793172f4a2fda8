"""`lvm` slots: a logical volume (LvmVolumeGroup + LvmVolume, or a /dev/VG/LV path in root or
HostDisk), holding the filesystem directly or, with `partition`, a partition table."""

from __future__ import annotations

import contextlib
import os
from typing import List, Union

from vmim.config import Slot
from vmim.disk import SlotDisk
from vmim.disk.kpartx import PartitionOf
from vmim.disk.partition import WholeDevice
from vmim.errors import StateError


class LvmDisk(SlotDisk):
    def __init__(self, slot: Slot):
        super().__init__(slot)
        self.inner: Union[WholeDevice, PartitionOf]
        if slot.partition is not None:
            self.inner = PartitionOf(self.source, slot.partition, slot.mapper, "logical volume")
        else:
            self.inner = WholeDevice(self.source, "logical volume")

    @property
    def source(self) -> str:
        return self.slot.disk or ""

    def describe(self) -> str:
        if self.slot.partition is not None:
            return f"{self.source} partition {self.slot.partition}"
        return self.source

    def _check_volume(self) -> None:
        if not os.path.exists(self.source):
            vg = self.slot.lvm_volume_group or "VG"
            lv = self.slot.lvm_volume or self.slot.name
            raise StateError(f"logical volume '{self.source}' does not exist; is it active? "
                             f"('lvchange -ay {vg}/{lv}')")

    def map(self, stack: contextlib.ExitStack) -> str:
        self._check_volume()
        return self.inner.map(stack)  # which checks the rest itself

    def mapped_devices(self) -> List[str]:
        return self.inner.mapped_devices()

    def unmap_all(self) -> List[str]:
        return self.inner.unmap_all()
