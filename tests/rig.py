"""The test rig of the integration and e2e tiers: root, real loop devices, real libvirtd on
qemu:///system. Their conftest.py files import it.

Tests skip (with the reason) when the machine lacks root or a reachable libvirtd; `make test`
provides both. An autouse fixture fails any test that leaks a mount, a loop device, a
running domain, a qemu-storage-daemon, a disk holder or a sandbox, and cleans up what it can so
that one leak does not fail the next test.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
import uuid
from typing import Iterator, List, Set

import pytest

from vmim import procscan
from vmim.paths import is_under

URI = "qemu:///system"
#: domain names of this test session: other sessions' and the host's domains are not ours
TEST_PREFIX = f"vmim-test-{uuid.uuid4().hex[:6]}-"


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
#
# The check owns what this test session made, and only that: loop devices backed by files
# under its temporary directory (or by the FUSE export of such a file), mounts there, domains
# named with this session's prefix or whose definition names a file there, and
# qemu-storage-daemons whose arguments do. A real hypervisor runs other VMs, mounts and loop
# devices, and other test sessions run beside this one: the check neither reports nor touches
# them.


def _owned_root() -> str:
    return os.path.realpath(os.environ.get("VMIM_TEST_ROOT", "/nonexistent-vmim-test-root"))


def _under(path: str, root: str) -> bool:
    return is_under(os.path.realpath(path) if path.startswith("/") else path, root)


def _mentions(text: str, root: str) -> bool:
    return root in text


def storage_daemons(root: str = "") -> Set[str]:
    """qemu-storage-daemon processes (the FUSE exports of qcow2 slots) whose arguments name a
    file under root (default: this test session's directory), as 'PID ARGS'."""
    root = root or _owned_root()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == "qemu-storage-daemon" and _mentions(" ".join(argv), root):
            found.add(f"{pid} {' '.join(argv[1:]).strip()}")
    return found


def disk_holders(root: str = "") -> Set[str]:
    """vmimagemanager-hold processes (a slot left mounted by --mount) holding a file under
    root (default: this test session's directory), as 'PID FILE'."""
    root = root or _owned_root()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0")[0]
            if os.path.basename(argv0) != b"vmimagemanager-hold":
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if _under(target, root):
                    found.add(f"{pid} {target}")
        except OSError:
            continue
    return found


def sandboxes(root: str = "") -> Set[str]:
    """Processes of a sandbox of guest data (vmim.sandbox, at any stage of its start) that bind
    a path under root (default: this test session's directory), as 'PID COMMAND': one that
    outlives its run pins the slot it binds in a mount namespace of its own."""
    root = root or _owned_root()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = procscan.cmdline(int(pid))
        if any(_under(source, root) for source in procscan.sandbox_sources(argv)):
            found.add(f"{pid} {procscan.comm(pid)}")
    return found


def _export_files(daemons: Set[str]) -> Set[str]:
    """The export files (FUSE mount points) of the given daemons."""
    found = set()
    for d in daemons:
        for m in re.finditer(r"mountpoint=((?:[^,]|,,)+)", d):
            found.add(m.group(1).replace(",,", ","))
    return found


def _loops(root: str, exports: Set[str]) -> Set[str]:
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True).stdout
    if not out.strip():
        return set()
    found = set()
    for d in json.loads(out).get("loopdevices", []):
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        if back and (_under(back, root) or back in exports):
            found.add(f"{d['name']} ({back})")
    return found


def _mounts(root: str, exports: Set[str], loops: Set[str]) -> Set[str]:
    devices = {lo.split(" ", 1)[0] for lo in loops}
    found = set()
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            src, point = fields[sep + 2], fields[4]
            if _under(point, root) or point in exports or src in devices:
                found.add(f"{src} on {point}")
    return found


def _self_binds(root: str) -> List[str]:
    """Directories under root bound onto themselves (mountinfo root == mount point): the shared
    mount bases the tool makes under which it mounts slots (mounts.ensure_shared)."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[3] != "/" and fields[3] == fields[4] and _under(fields[4], root):
                found.append(fields[4])
    return found


def _running_domains(root: str) -> Set[str]:
    import libvirt

    conn = libvirt.open(URI)
    try:
        found = set()
        for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                if d.name().startswith(TEST_PREFIX) or _mentions(d.XMLDesc(0), root):
                    found.add(d.name())
            except libvirt.libvirtError:
                continue  # gone meanwhile
        return found
    finally:
        conn.close()


def _owned() -> tuple:
    root = _owned_root()
    daemons = storage_daemons(root)
    exports = _export_files(daemons)
    loops = _loops(root, exports)
    return loops, _mounts(root, exports, loops), _running_domains(root), daemons, \
        disk_holders(root), sandboxes(root)


@pytest.fixture(scope="session", autouse=True)
def _test_root(tmp_path_factory):
    """This session's directory: everything the leak check owns lives under it."""
    os.environ["VMIM_TEST_ROOT"] = str(os.path.realpath(tmp_path_factory.getbasetemp()))
    yield


@pytest.fixture(autouse=True)
def no_leaks(request, _test_root):
    """Fail a test that leaves a loop device, a mount, a running domain, a
    qemu-storage-daemon, a disk holder or a sandbox of this session behind."""
    if os.geteuid() != 0:
        yield
        return
    root = _owned_root()
    before = _owned()
    binds = set(_self_binds(root))
    yield
    bases = [b for b in _self_binds(root) if b not in binds]  # made by the tool: not a leak
    after = _owned()
    deadline = time.monotonic() + 3
    while after[5] - before[5] and time.monotonic() < deadline:  # a SIGKILL being handled
        time.sleep(0.05)
        after = _owned()
    after = (after[0], {m for m in after[1] if m.split(" on ", 1)[1] not in bases}, *after[2:])
    leaked: List[str] = []
    kinds = ("loop device", "mount", "running domain", "qemu-storage-daemon", "disk holder",
             "sandbox")
    for kind, b, a in zip(kinds, before, after):
        leaked += [f"{kind}: {x}" for x in sorted(a - b)]
    if leaked:
        _clean_up(after[1] - before[1], after[0] - before[0], after[2] - before[2])
        for proc in (after[3] - before[3]) | (after[4] - before[4]) | (after[5] - before[5]):
            # after the loops: a daemon unmounts its export itself
            subprocess.run(["kill", "-KILL" if proc in after[5] else "-TERM",
                            proc.split(" ", 1)[0]], capture_output=True)
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

    def define(self, name: str, *, memory_mib: int = 32, start: bool = False, disk: str = "",
               fmt: str = "raw") -> str:
        disk_xml = ""
        if disk:
            disk_xml = (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
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
