"""`partition` slots: the root filesystem is a whole block device or file (`root` or `HostDisk`)."""

from __future__ import annotations

import contextlib
import os
import stat
from typing import List

from vmim.config import Slot
from vmim.disk import SlotDisk, check_exists, loop


class WholeDevice:
    """A file or block device that holds a filesystem directly; a file goes through a loop device."""

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what

    def check(self) -> os.stat_result:
        return check_exists(self.path, self.what)

    def map(self, stack: contextlib.ExitStack) -> str:
        st = self.check()
        if stat.S_ISBLK(st.st_mode):
            return self.path
        device = loop.attach(self.path)
        stack.callback(loop.detach, device)
        return device

    def mapped_devices(self) -> List[str]:
        return [lo.device for lo in loop.loops_backed_by(self.path)]

    def unmap_all(self) -> List[str]:
        undone = []
        for lo in loop.loops_backed_by(self.path):
            loop.detach(lo.device)
            undone.append(f"detached {lo.device}")
        return undone


class PartitionDisk(SlotDisk):
    def __init__(self, slot: Slot):
        super().__init__(slot)
        path = slot.root or slot.hostdisk
        assert path is not None  # the config requires one of them for this store_type
        self.whole = WholeDevice(path, "root" if slot.root else "HostDisk")

    @property
    def source(self) -> str:
        return self.whole.path

    def map(self, stack: contextlib.ExitStack) -> str:
        return self.whole.map(stack)

    def mapped_devices(self) -> List[str]:
        return self.whole.mapped_devices()

    def unmap_all(self) -> List[str]:
        return self.whole.unmap_all()
