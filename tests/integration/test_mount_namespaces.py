"""One filesystem mounted twice (issue 12, hole 2): each QEMU that libvirt starts copies the
host's mounts into a mount namespace of its own. A slot mounted at that moment must not stay
pinned there, and a disk that still has a live loop device or a mount in any namespace is
never mapped a second time.

Real pieces: an ext4 image file, loop devices, a `type='qemu'` libvirt domain (no disk, it
boots nothing) whose QEMU makes the namespace copy, /proc/PID/mountinfo to look inside it."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from tests.integration import diskimages as di
from vmim.disk import loop, mounts
from vmim.errors import CleanupError


@pytest.fixture
def slot(tmp_path, write_config, domains):
    os.chmod(tmp_path, 0o755)
    disk = str(tmp_path / "slot.img")
    di.filesystem_image(disk, "ext4", 24, "pinned")
    name = domains.name("pin")
    base = str(tmp_path / "mnt")
    cfg = write_config(f"""\
    [vmim.local]
    mount = "{base}"
    lockdir = "{tmp_path}/locks"
    [vmim.vm.pin]
    HostName = "{name}"
    root = "{disk}"
    """)
    return Slot(name, disk, base, os.path.join(base, name), cfg)


class Slot:
    def __init__(self, name, disk, base, mountpoint, cfg):
        self.name = name
        self.disk = disk
        self.base = base
        self.mountpoint = mountpoint
        self.cfg = cfg


def qemu_pid(name: str) -> int:
    with open(f"/run/libvirt/qemu/{name}.pid") as fh:
        return int(fh.read().strip())


def targets_in(pid: int) -> set:
    with open(f"/proc/{pid}/mountinfo") as fh:
        return {m.target for m in mounts.parse_mountinfo(fh.read())}


def start_qemu(domains, hint: str) -> tuple:
    """A QEMU started now copies the host's mounts (a domain with no disk boots nothing)."""
    name = domains.define(domains.name(hint), start=True)
    return name, qemu_pid(name)


def make_base_private(base: str) -> None:
    """The state of a host before fix (a): the slot's mount propagates nowhere."""
    if any(m.target == base for m in mounts.all_mounts()):
        di.run("mount", "--make-rprivate", base)


def destroy(domains, name: str) -> None:
    domains.conn.lookupByName(name).destroy()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/run/libvirt/qemu/{name}.pid") and time.monotonic() < deadline:
        time.sleep(0.1)


def test_qemu_started_while_mounted_does_not_pin_the_mount(vmim, slot, domains):
    """Fix (a): the slot is mounted under a shared base, so QEMU's copy is a slave mount that
    receives the host's unmount."""
    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
    assert r.code == 0, r
    base = [m for m in mounts.all_mounts() if m.target == slot.base]
    assert len(base) == 1 and base[0].shared, base  # a shared mount point, made once

    dom, pid = start_qemu(domains, "qemu")
    assert slot.mountpoint in targets_in(pid)  # QEMU copied the slot's mount

    r = vmim("-b", slot.name, "--release", "--config", slot.cfg)
    assert r.code == 0, r
    assert slot.mountpoint not in targets_in(pid)  # the unmount reached QEMU's namespace
    assert loop.loops_backed_by(slot.disk) == []  # and the loop device is really gone

    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)  # idempotent: no second bind
    assert r.code == 0, r
    assert len([m for m in mounts.all_mounts() if m.target == slot.base]) == 1
    assert len(loop.loops_backed_by(slot.disk)) == 1
    assert vmim("-b", slot.name, "--release", "--config", slot.cfg).code == 0
    destroy(domains, dom)
    assert loop.loops_backed_by(slot.disk) == []


@pytest.mark.parametrize("remedy", ["shut down", "nsenter"])
def test_disk_pinned_in_another_namespace_is_never_mapped_twice(vmim, slot, domains, remedy):
    """Fix (b): with a private base (a host before fix (a), or a base made private later) QEMU
    pins the mount. Release and mount say which domain holds it and never map a second loop
    device on the same filesystem; either remedy the message offers frees it."""
    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
    assert r.code == 0, r
    make_base_private(slot.base)
    dom, pid = start_qemu(domains, "pinner")
    try:
        assert slot.mountpoint in targets_in(pid)

        r = vmim("-b", slot.name, "--release", "--config", slot.cfg)
        assert r.code == 8, r
        assert "again" not in r.err  # running --release again cannot help
        assert f"pid {pid}" in r.err and f"'{dom}'" in r.err and "shut down" in r.err, r.err
        assert mounts.mounted_at(slot.mountpoint) is None  # our namespace is clean
        held = loop.loops_backed_by(slot.disk)
        assert len(held) == 1

        for _ in range(2):  # twice: nothing is "cleaned up" either time
            r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
            assert r.code == 8, r
            assert "detached" not in r.err and "cleaned up" not in r.err, r.err
            assert f"'{dom}'" in r.err and slot.mountpoint in r.err, r.err
            assert loop.loops_backed_by(slot.disk) == held  # never a second loop device
            assert mounts.mounted_at(slot.mountpoint) is None
        if remedy == "nsenter":  # the domain may go on running
            di.run("nsenter", "-t", str(pid), "-m", "umount", slot.mountpoint)
            assert slot.mountpoint not in targets_in(pid)
            r = vmim("-b", slot.name, "--release", "--config", slot.cfg)
            assert r.code == 0, r
            assert loop.loops_backed_by(slot.disk) == []
    finally:
        destroy(domains, dom)

    # The holder is gone: release frees the loop device, mount works again.
    r = vmim("-b", slot.name, "--release", "--config", slot.cfg)
    assert r.code == 0, r
    assert loop.loops_backed_by(slot.disk) == []
    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
    assert r.code == 0, r
    assert len(loop.loops_backed_by(slot.disk)) == 1
    assert vmim("-b", slot.name, "--release", "--config", slot.cfg).code == 0
    assert loop.loops_backed_by(slot.disk) == []
    res = subprocess.run(["e2fsck", "-fn", slot.disk], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr  # the filesystem is whole


@pytest.mark.parametrize("how", [os.O_RDONLY, os.O_RDONLY | os.O_EXCL], ids=["open", "exclusive"])
def test_loop_device_that_cannot_be_freed_is_not_reported_detached(vmim, slot, how):
    """A leftover loop device that a process holds open: `losetup --detach` succeeds but only
    marks it autoclear. --mount must see it is still there, say so, and map no second one."""
    device = di.run("losetup", "--find", "--show", slot.disk).strip()
    fd = os.open(device, how)
    try:
        r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
        assert r.code == 8, r
        assert device in r.err and ("still attached" in r.err or "in use" in r.err), r.err
        assert "cleaned up" not in r.err
        assert [lo.device for lo in loop.loops_backed_by(slot.disk)] == [device]
        assert mounts.mounted_at(slot.mountpoint) is None
    finally:
        os.close(fd)
    if loop.loops_backed_by(slot.disk):  # not marked autoclear (exclusive open): free it
        di.run("losetup", "--detach", device)
    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
    assert r.code == 0, r
    assert len(loop.loops_backed_by(slot.disk)) == 1
    assert vmim("-b", slot.name, "--release", "--config", slot.cfg).code == 0
    assert loop.loops_backed_by(slot.disk) == []


def test_base_with_mounts_below_it_is_not_bound_over_them(vmim, slot, tmp_path):
    """A base that is no mount point but already has something mounted below it (a slot mounted
    by an older version) is not bound: the bind would hide that mount. A warning says why."""
    other = os.path.join(slot.base, "older")
    os.makedirs(other)
    di.filesystem_image(str(tmp_path / "older.img"), "ext4", 16, "older")
    with di.attached(str(tmp_path / "older.img")) as dev:
        di.run("mount", dev, other)
        try:
            r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
            assert r.code == 0, r
            assert "cannot make" in r.err and "older" in r.err, r.err
            assert not any(m.target == slot.base for m in mounts.all_mounts())
            assert os.path.exists(os.path.join(other, "marker"))  # still visible
            assert vmim("-b", slot.name, "--release", "--config", slot.cfg).code == 0
        finally:
            di.run("umount", other)
    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)  # now it is made shared
    assert r.code == 0, r
    assert [m.shared for m in mounts.all_mounts() if m.target == slot.base] == [True]
    assert vmim("-b", slot.name, "--release", "--config", slot.cfg).code == 0



@pytest.fixture
def attached(slot, tmp_path):
    """slot's disk on a loop device of its own, mounted at tmp_path/here; whatever a test
    leaves of both is undone."""
    device = di.run("losetup", "--find", "--show", slot.disk).strip()
    point = tmp_path / "here"
    point.mkdir()
    di.run("mount", device, str(point))
    yield device, point
    subprocess.run(["umount", str(point)], capture_output=True)
    if loop.attached_file(device) == slot.disk:
        subprocess.run(["losetup", "--detach", device], capture_output=True)


def test_a_loop_device_held_for_a_moment_is_detached_once_it_is_let_go(attached):
    """A mount namespace that just ended gives its mounts back a moment later (the kernel's
    delayed mntput; a busy host shows it): detach waits for that, not failing at once."""
    device, point = attached
    di.run("umount", str(point))
    fd = os.open(device, os.O_RDONLY | os.O_EXCL)  # what a dying namespace's mount does
    guard, open_ = threading.Lock(), [True]

    def let_go() -> None:
        with guard:
            if open_[0]:
                os.close(fd)
                open_[0] = False

    timer = threading.Timer(0.3, let_go)
    try:
        assert loop.claimed(device)
        timer.start()
        loop.detach(device)
    finally:
        timer.cancel()
        let_go()
    assert loop.attached_file(device) == ""


def test_a_loop_device_mounted_in_another_namespace_names_its_holder(attached):
    """A process that copied the mount into a private namespace of its own keeps the device:
    detach refuses after its wait, naming the process and how to free it."""
    device, point = attached
    pinner = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               "sleep", "60"])
    try:
        for _ in range(50):  # unshare has made its copy of the mounts and become sleep
            try:
                if os.readlink(f"/proc/{pinner.pid}/exe").endswith("/sleep"):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert str(point) in targets_in(pinner.pid)
        di.run("umount", str(point))
        with pytest.raises(CleanupError) as err:
            loop.detach(device)
        text = str(err.value)
        assert f"pid {pinner.pid} (sleep" in text and str(point) in text, text
        assert f"nsenter -t {pinner.pid} -m umount" in text, text
    finally:
        pinner.kill()
        pinner.wait()
    for _ in range(50):  # its namespace ends with it, and gives the mount back
        if not loop.claimed(device):
            break
        time.sleep(0.1)
    loop.detach(device)
    assert loop.attached_file(device) == ""
