"""Mounts in other mount namespaces: who still holds a slot's filesystem where we cannot see it.

Every QEMU that libvirt starts runs in a mount namespace of its own, a copy of the host's mounts
at that moment. When the mount base was not a shared mount (see mounts.ensure_shared), a slot
mounted then stays mounted in that copy after the host unmounts it, and keeps its loop device
alive. This module finds such mounts (one /proc/PID/mountinfo per namespace) and names the
process, and the libvirt domain when it is a QEMU, so the tool can refuse and say what to do.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from vmim import procscan
from vmim.disk import mounts


@dataclass(frozen=True)
class Holder:
    """A mount of one of our devices in the mount namespace of another process."""

    pid: int
    command: str
    domain: Optional[str]  # the libvirt domain, when the process is its QEMU
    target: str  # where it is mounted in that namespace
    source: str

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command}"
        if self.domain:
            who += f", libvirt domain '{self.domain}'"
        return f"{self.source} is mounted at {self.target} in the mount namespace of {who})"

    def remedy(self) -> str:
        unmount = f"'nsenter -t {self.pid} -m umount {self.target}'"
        if self.domain:
            return (f"shut down domain '{self.domain}' (which pinned the mount when it started) "
                    f"or unmount it there with {unmount}")
        return f"stop pid {self.pid} ({self.command}) or unmount it there with {unmount}"


def other_namespaces() -> Dict[str, List[int]]:
    """Mount namespaces other than ours → their processes (pids in ascending order)."""
    ours = procscan.mount_namespace("self")
    found: Dict[str, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ns = procscan.mount_namespace(name)
            if ns and ns != ours:
                found.setdefault(ns, []).append(int(name))
    return {ns: sorted(pids) for ns, pids in found.items()}


def guest_name(argv: Sequence[str]) -> Optional[str]:
    """The guest name in a QEMU command line: `-name guest=NAME,debug-threads=on` (a comma in
    NAME is doubled) or the older `-name NAME`."""
    for i, arg in enumerate(argv[:-1]):
        if arg != "-name":
            continue
        value = argv[i + 1]
        if value.startswith("guest="):
            value = value[len("guest="):]
        elif "=" in value.split(",", 1)[0]:
            continue
        name, j = [], 0
        while j < len(value):
            if value[j] == ",":
                if value[j + 1:j + 2] != ",":
                    break
                j += 1
            name.append(value[j])
            j += 1
        return "".join(name) or None
    return None


def domain_of(pid: int) -> Optional[str]:
    """The libvirt domain whose QEMU pid is, if it is one."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode("utf-8", "surrogateescape").split("\0")
    except OSError:
        return None
    if not any("qemu" in a for a in argv[:1]):
        return None
    return guest_name(argv)


def _devnos(devices: Iterable[str]) -> Dict[int, str]:
    found = {}
    for dev in devices:
        try:
            st = os.stat(dev)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            found[st.st_rdev] = dev
    return found


def mounts_elsewhere(devices: Iterable[str]) -> List[Holder]:
    """Mounts of devices in mount namespaces other than ours, one process named per namespace
    (a QEMU when there is one)."""
    devices = list(devices)
    devnos = _devnos(devices)
    if not devnos:
        return []
    held: List[Holder] = []
    for pids in other_namespaces().values():
        mine = []
        for pid in pids:  # any process shows its namespace's mounts; the first readable one
            try:
                with open(f"/proc/{pid}/mountinfo", encoding="utf-8",
                          errors="surrogateescape") as fh:
                    mine = [m for m in mounts.parse_mountinfo(fh.read()) if m.devno in devnos]
                break
            except OSError:
                continue
        if not mine:
            continue
        pid = next((p for p in pids if domain_of(p)), pids[0])
        for m in mine:
            held.append(Holder(pid, procscan.comm(str(pid)), domain_of(pid), m.target,
                               devnos[m.devno]))
    return held


def describe(holders: Sequence[Holder]) -> str:
    """What holds the devices and what to do, for an error message."""
    seen: List[str] = []
    for h in holders:
        if h.remedy() not in seen:
            seen.append(h.remedy())
    return f"{'; '.join(h.describe() for h in holders)}. To free it, {' and '.join(seen)}"
