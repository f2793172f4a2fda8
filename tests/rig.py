"""The test rig of the integration and e2e tiers: root, real loop devices, real libvirtd on
qemu:///system. Their conftest.py files import it.

Tests skip (with the reason) when the machine lacks root or a reachable libvirtd; `make test`
provides both. An autouse fixture fails any test that leaks a mount, a loop device, a
running domain or a qemu-storage-daemon, and cleans up what it can so that one leak does not
fail the next test.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from typing import Iterator, List, Set

import pytest

URI = "qemu:///system"
TEST_PREFIX = "vmim-test-"


def _libvirt_reachable() -> str:
    """Empty when qemu:///system answers, else the reason it does not."""
    try:
        import libvirt
    except ImportError as exc:
        return f"libvirt-python missing: {exc}"
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        return f"libvirtd unreachable at {URI}: {exc} (make test starts it)"
    return ""


def skip_without_host(items, here: str) -> None:
    """Mark the tests below `here` skipped when this machine cannot run them."""
    mine = [i for i in items if str(i.fspath).startswith(here)]
    if not mine:
        return
    reason = ""
    if os.geteuid() != 0:
        reason = "integration tests need root (loop devices, mounts, qemu:///system)"
    else:
        reason = _libvirt_reachable()
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _traversable_tmp(tmp_path_factory):
    """QEMU runs as libvirt-qemu: disk images under pytest's 0700 temp dirs must be reachable."""
    if os.geteuid() == 0:
        base = tmp_path_factory.getbasetemp()
        for d in (base, base.parent):
            # only add search and read for others: never take the sticky bit or write access
            # away from a shared parent such as /tmp (with --basetemp=/tmp/NAME)
            os.chmod(d, stat.S_IMODE(os.stat(d).st_mode) | 0o055)


# ------------------------------------------------------------------ leak detection


def _loops() -> Set[str]:
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True).stdout
    if not out.strip():
        return set()
    return {f"{d['name']} ({d.get('back-file')})" for d in json.loads(out).get("loopdevices", [])}


def _mounts() -> Set[str]:
    found = set()
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            found.add(f"{fields[sep + 2]} on {fields[4]}")
    return found


def _self_binds() -> List[str]:
    """Directories bound onto themselves (mountinfo root == mount point): the shared mount bases
    the tool makes under which it mounts slots (mounts.ensure_shared). They stay by design."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[3] != "/" and fields[3] == fields[4]:
                found.append(fields[4])
    return found


def storage_daemons() -> Set[str]:
    """qemu-storage-daemon processes (the FUSE exports of qcow2 slots), as 'PID ARGS'."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == "qemu-storage-daemon":
            found.add(f"{pid} {' '.join(argv[1:]).strip()}")
    return found


def _running_domains() -> Set[str]:
    import libvirt

    conn = libvirt.open(URI)
    try:
        return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a loop device, a mount, a running domain or a
    qemu-storage-daemon behind."""
    if os.geteuid() != 0:
        yield
        return
    before = (_loops(), _mounts(), _running_domains(), storage_daemons())
    binds = set(_self_binds())
    yield
    bases = [b for b in _self_binds() if b not in binds]  # made by the tool: not a leak
    after = (_loops(), {m for m in _mounts() if m.split(" on ", 1)[1] not in bases},
             _running_domains(), storage_daemons())
    leaked: List[str] = []
    kinds = ("loop device", "mount", "running domain", "qemu-storage-daemon")
    for kind, b, a in zip(kinds, before, after):
        leaked += [f"{kind}: {x}" for x in sorted(a - b)]
    if leaked:
        _clean_up(after[1] - before[1], after[0] - before[0], after[2] - before[2])
        for daemon in after[3] - before[3]:  # after the loops: it unmounts its export itself
            subprocess.run(["kill", daemon.split(" ", 1)[0]], capture_output=True)
    for base in sorted(bases, key=len, reverse=True):  # leave the host as it was
        subprocess.run(["umount", "-l", base], capture_output=True)
    if leaked:
        pytest.fail("test leaked host resources:\n  " + "\n  ".join(leaked), pytrace=False)


def _clean_up(mounts: Set[str], loops: Set[str], domains: Set[str]) -> None:
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m.split(" on ", 1)[1]], capture_output=True)
    for lo in loops:
        subprocess.run(["losetup", "-d", lo.split(" ", 1)[0]], capture_output=True)
    if domains:
        import libvirt

        conn = libvirt.open(URI)
        for name in domains:
            try:
                conn.lookupByName(name).destroy()
            except libvirt.libvirtError:
                pass
        conn.close()


# ------------------------------------------------------------------ domains


class Domains:
    """Defines `type='qemu'` test domains and removes every one of them afterwards."""

    def __init__(self) -> None:
        import libvirt

        self.libvirt = libvirt
        self.conn = libvirt.open(URI)
        self.names: List[str] = []

    def name(self, hint: str = "dom") -> str:
        return f"{TEST_PREFIX}{hint}-{uuid.uuid4().hex[:8]}"

    def define(self, name: str, *, memory_mib: int = 32, start: bool = False, disk: str = "") -> str:
        disk_xml = ""
        if disk:
            disk_xml = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>")
        xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>{disk_xml}</devices>
</domain>"""
        dom = self.conn.defineXML(xml)
        self.names.append(name)
        if start:
            dom.create()
        return name

    def track(self, name: str) -> str:
        """Remove this domain at the end too (one the tool under test defines)."""
        self.names.append(name)
        return name

    def state(self, name: str) -> int:
        return self.conn.lookupByName(name).state()[0]

    def close(self) -> None:
        for name in self.names:
            try:
                dom = self.conn.lookupByName(name)
            except self.libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        self.conn.close()


@pytest.fixture
def domains() -> Iterator[Domains]:
    d = Domains()
    try:
        yield d
    finally:
        d.close()
