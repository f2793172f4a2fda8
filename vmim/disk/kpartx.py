"""`kpartx` slots: HostDisk carries an MBR or GPT table; the root filesystem is partition N.

Two mappers. `loop` (default): a loop device over the partition's byte range, read from the
table with `sfdisk --json` — works on every kernel. `kpartx`: device-mapper nodes made by
`kpartx -p vmim`, for hosts that have device-mapper (the test machines do not: its output
parsing is tested on recorded output).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List

from vmim import process
from vmim.config import Slot
from vmim.disk import SlotDisk, check_exists, loop
from vmim.errors import CommandError, StateError, ToolMissingError

PREFIX = "vmim"
# `kpartx -l`:  loop0vmim1 : 0 32768 /dev/loop0 2048
_LIST_LINE = re.compile(r"^(?P<name>\S*?" + PREFIX + r"(?P<num>\d+)) : \d+ \d+ (?P<dev>\S+) \d+")
# `kpartx -av`: add map loop0vmim1 (254:0): 0 32768 linear 7:0 2048
_ADD_LINE = re.compile(r"^add map (?P<name>\S*?" + PREFIX + r"(?P<num>\d+)) \(\d+:\d+\): ")


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes


def parse_sfdisk(text: str) -> List[Partition]:
    table = json.loads(text)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    out = []
    for p in table.get("partitions", []):
        m = re.search(r"(\d+)$", p["node"])
        if m is None:
            continue
        out.append(Partition(int(m.group(1)), int(p["start"]) * sector, int(p["size"]) * sector))
    return out


def read_table(disk: str) -> List[Partition]:
    try:
        res = process.run(["sfdisk", "--json", "--", disk], capture=True)
    except CommandError as exc:
        if "does not contain a recognized partition table" in exc.stderr_tail:
            return []
        raise
    return parse_sfdisk(res.stdout)


def parse_kpartx(text: str) -> Dict[int, str]:
    """Partition number → /dev/mapper node, from `kpartx -l` or `kpartx -av` output."""
    found: Dict[int, str] = {}
    for line in text.splitlines():
        m = _ADD_LINE.match(line) or _LIST_LINE.match(line)
        if m:
            found[int(m.group("num"))] = f"/dev/mapper/{m.group('name')}"
    return found


def find_partition(disk: str, number: int) -> Partition:
    parts = read_table(disk)
    if not parts:
        raise StateError(f"disk '{disk}' has no partition table (MBR or GPT), but the slot names "
                         f"partition {number}; drop `partition` if the disk holds the filesystem "
                         "directly")
    for p in parts:
        if p.number == number:
            return p
    have = ", ".join(str(p.number) for p in parts)
    raise StateError(f"disk '{disk}' has no partition {number} (it has {have})")


class PartitionOf:
    """Partition `number` of a disk image or block device, mapped by `loop` or `kpartx`."""

    def __init__(self, disk: str, number: int, mapper: str, what: str = "HostDisk"):
        self.disk = disk
        self.number = number
        self.mapper = mapper
        self.what = what

    def map(self, stack: contextlib.ExitStack) -> str:
        check_exists(self.disk, self.what)
        if self.mapper == "kpartx":
            return self._map_kpartx(stack)
        part = find_partition(self.disk, self.number)
        device = loop.attach(self.disk, offset=part.start, size=part.size)
        stack.callback(loop.detach, device)
        return device

    def _kpartx(self) -> str:
        path = shutil.which("kpartx")
        if path is None:
            raise ToolMissingError("kpartx", "install it, or use mapper = \"loop\" for this slot")
        return path

    def _map_kpartx(self, stack: contextlib.ExitStack) -> str:
        kpartx = self._kpartx()
        res = process.run([kpartx, "-s", "-p", PREFIX, "-av", self.disk], capture=True)
        stack.callback(process.run, [kpartx, "-s", "-p", PREFIX, "-d", self.disk])
        nodes = parse_kpartx(res.stdout)
        if self.number not in nodes:
            have = ", ".join(str(n) for n in sorted(nodes)) or "none"
            raise StateError(f"disk '{self.disk}' has no partition {self.number} "
                             f"(kpartx mapped: {have})")
        return nodes[self.number]

    def _mapper_nodes(self) -> List[str]:
        """device-mapper nodes of this disk's partitions that exist now."""
        if self.mapper != "kpartx" or not shutil.which("kpartx") or not os.path.exists(self.disk):
            return []
        res = process.run([self._kpartx(), "-p", PREFIX, "-l", self.disk], capture=True,
                          ok_codes=(0, 1))
        # -l lists what a mapping would create; only existing nodes are mapped now.
        return [n for n in parse_kpartx(res.stdout).values() if os.path.exists(n)]

    def mapped_devices(self) -> List[str]:
        return [lo.device for lo in loop.loops_backed_by(self.disk)] + self._mapper_nodes()

    def unmap_all(self) -> List[str]:
        undone = []
        if self._mapper_nodes():
            process.run([self._kpartx(), "-s", "-p", PREFIX, "-d", self.disk])
            undone.append(f"kpartx -d {self.disk}")
        for lo in loop.loops_backed_by(self.disk):
            loop.detach(lo.device)
            undone.append(f"detached {lo.device}")
        return undone


class KpartxDisk(SlotDisk):
    def __init__(self, slot: Slot):
        super().__init__(slot)
        assert slot.hostdisk is not None and slot.partition is not None  # config checked both
        self.part = PartitionOf(slot.hostdisk, slot.partition, slot.mapper)

    @property
    def source(self) -> str:
        return self.part.disk

    def describe(self) -> str:
        return f"{self.part.disk} partition {self.part.number}"

    def map(self, stack: contextlib.ExitStack) -> str:
        return self.part.map(stack)

    def mapped_devices(self) -> List[str]:
        return self.part.mapped_devices()

    def unmap_all(self) -> List[str]:
        return self.part.unmap_all()
