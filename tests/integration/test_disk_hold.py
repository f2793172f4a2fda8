"""The disk hold (vmim.disk.hold) against real libvirt and real QEMU: while the tool has a slot's
disk mapped it holds QEMU's own lock bytes on it, so a domain started in that window fails
instead of booting a mounted disk; a disk some QEMU holds is never mapped, whatever libvirt
says; the hold ends with the release, with the run, or with a run killed by SIGKILL.

Domains here need no OS: QEMU opens (and locks) its disks when it starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass

import pytest

from tests.integration import diskimages as di
from vmim.disk import hold, loop, mounts


@dataclass
class Slot:
    root: object
    cfg: str
    name: str
    disk: str
    mnt: str


@pytest.fixture
def slot(tmp_path, write_config, domains):
    """A `partition` slot on a 24 MiB ext4 file (/marker 'bare'), its domain defined with that
    disk (shut off), and `golden.tgz` in the image store (/marker 'golden')."""
    os.chmod(tmp_path, 0o755)
    disk = str(tmp_path / "slot.img")
    di.filesystem_image(disk, "ext4", 24, "bare")
    images = tmp_path / "images"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "marker").write_text("golden\n")
    images.mkdir()
    with tarfile.open(images / "golden", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname=".")
    name = domains.define(domains.name("hold"), disk=disk)
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    [vmim.vm.s]
    HostName = "{name}"
    root = "{disk}"
    """)
    s = Slot(tmp_path, cfg, name, disk, str(tmp_path / "mnt" / name))
    yield s
    subprocess.run([sys.executable, "-m", "vmim", "--config", cfg, "-b", name, "--release"],
                   capture_output=True)
    assert hold.holders(disk) == []  # no holder process outlives the test


def start(domains, name):
    """Start a domain; when it fails, libvirt's error and the end of QEMU's log (libvirt does
    not always catch QEMU's message: 'process exited while connecting to monitor')."""
    try:
        domains.conn.lookupByName(name).create()
    except domains.libvirt.libvirtError as exc:
        try:
            with open(f"/var/log/libvirt/qemu/{name}.log", errors="replace") as fh:
                log = fh.read()[-2000:]
        except OSError:
            log = ""
        return f"{exc} [log: {log}]"
    return ""


def start_in_the_window(monkeypatch, module, function, domains, name):
    """Start domain `name` from inside the tool, once, just before it calls module.function
    (mount(8), a copy...): the race made deterministic. Returns the list that gets libvirt's
    error (or "started")."""
    errors = []
    real = getattr(module, function)

    def racing(*args, **kwargs):
        if not errors:
            errors.append(start(domains, name) or "started")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function, racing)
    return errors


def fsck_clean(disk: str) -> bool:
    return subprocess.run(["e2fsck", "-fn", disk], capture_output=True).returncode == 0


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def test_a_domain_started_between_the_plan_and_the_mount_fails_to_start(vmim, slot, domains,
                                                                        monkeypatch):
    """Finding 4: `virsh start` in the window after the plan saw the domain shut off. The start
    is made deterministic by doing it from inside the tool, just before mount(8)."""
    errors = start_in_the_window(monkeypatch, mounts, "mount", domains, slot.name)
    r = vmim("-b", slot.name, "-r", "golden", "--release", "--config", slot.cfg)
    assert errors and 'Failed to get "write" lock' in errors[0], errors
    assert domains.state(slot.name) == 5  # shut off: it never ran on the mounted disk
    assert r.code == 0, r
    assert mounts.mounted_at(slot.mnt) is None and loop.loops_backed_by(slot.disk) == []
    assert fsck_clean(slot.disk)
    with di.attached(slot.disk) as dev, di.mounted(dev, "ro") as mp:
        assert read(os.path.join(mp, "marker")) == "golden\n"
    assert start(domains, slot.name) == ""  # released: it starts now
    domains.conn.lookupByName(slot.name).destroy()


def test_a_disk_a_qemu_of_another_domain_holds_is_refused_before_mapping(vmim, slot, domains,
                                                                         tmp_path):
    """Finding 4, the converse: a running QEMU holds the slot's disk (here as the backing file
    of another domain's overlay: libvirt's disk list of that domain does not name it), so the
    disk is live whatever libvirt says of the slot's domain: exit 4 naming that domain."""
    overlay = str(tmp_path / "other.qcow2")
    di.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", slot.disk, "-F", "raw", overlay)
    other = domains.name("other")
    domains.conn.defineXML(f"""<domain type='qemu'><name>{other}</name>
      <memory unit='MiB'>32</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{overlay}'/><target dev='vda' bus='virtio'/></disk></devices></domain>""")
    domains.names.append(other)
    assert start(domains, other) == ""
    try:
        for argv in (["--mount"], ["-r", "golden"]):
            r = vmim("-b", slot.name, *argv, "--config", slot.cfg)
            assert r.code == 4, r
            assert "in use" in r.err and other in r.err and "lock" in r.err, r
            assert loop.loops_backed_by(slot.disk) == [] and mounts.mounted_at(slot.mnt) is None
    finally:
        domains.conn.lookupByName(other).destroy()
    assert fsck_clean(slot.disk)
    with di.attached(slot.disk) as dev, di.mounted(dev, "ro") as mp:
        assert read(os.path.join(mp, "marker")) == "bare\n"


def test_a_qemu_libvirt_does_not_know_holds_the_disk(vmim, slot, tmp_path):
    """A QEMU started outside libvirt (another URI, a script) opens the slot's disk: refused."""
    qemu = subprocess.Popen(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none",
                             "-machine", "pc,accel=tcg", "-m", "32", "-drive",
                             f"file={slot.disk},format=raw,if=virtio"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not hold.holders(slot.disk) and time.monotonic() < deadline:
            time.sleep(0.1)
        r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
        assert r.code == 4, r
        assert f"pid {qemu.pid} (qemu-system-x86_64)" in r.err, r
        assert loop.loops_backed_by(slot.disk) == []
    finally:
        qemu.kill()
        qemu.wait()


def test_mount_keeps_the_hold_until_release(vmim, slot, domains):
    """--mount leaves the slot mounted: a holder process keeps the hold after the command ends,
    so the domain cannot start; --release stops it, and the domain starts."""
    r = vmim("-b", slot.name, "--mount", "--config", slot.cfg)
    assert r.code == 0, r
    (holder,) = hold.our_holders(slot.disk)
    error = start(domains, slot.name)
    assert 'Failed to get "write" lock' in error, error
    # a second command on the mounted slot works with it, and leaves one holder
    assert vmim("-b", slot.name, "--mount", "--config", slot.cfg).code == 0
    assert hold.our_holders(slot.disk) == [holder]
    r = vmim("-b", slot.name, "--release", "--config", slot.cfg)
    assert r.code == 0, r
    assert hold.our_holders(slot.disk) == []
    assert not os.path.exists(f"/proc/{holder}/fd")
    assert start(domains, slot.name) == ""
    domains.conn.lookupByName(slot.name).destroy()


def test_up_after_mount_releases_then_starts(vmim, slot, domains):
    assert vmim("-b", slot.name, "--mount", "--config", slot.cfg).code == 0
    r = vmim("-b", slot.name, "-u", "--config", slot.cfg)
    assert r.code == 0, r
    assert domains.state(slot.name) == 1
    assert hold.our_holders(slot.disk) == []
    domains.conn.lookupByName(slot.name).destroy()


def test_a_run_killed_by_sigkill_holds_nothing(slot, domains, tmp_path):
    """The kernel drops the locks of a killed run (its descriptors close): the domain starts."""
    ready = tmp_path / "in-mount"
    code = f"""
import sys, time
from vmim.disk import mounts
def stuck(*a, **k):
    open({str(ready)!r}, "w").close()
    time.sleep(600)
mounts.mount = stuck
from vmim.cli import main
sys.exit(main(["--config", {slot.cfg!r}, "-b", {slot.name!r}, "--mount"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        assert [h.pid for h in hold.holders(slot.disk)] == [proc.pid]
        assert 'Failed to get "write" lock' in start(domains, slot.name)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert hold.holders(slot.disk) == []
    assert start(domains, slot.name) == ""
    domains.conn.lookupByName(slot.name).destroy()
    # what the killed run left mapped is undone by the next one
    r = subprocess.run([sys.executable, "-m", "vmim", "--config", slot.cfg, "-b", slot.name,
                        "--release"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert loop.loops_backed_by(slot.disk) == []


@pytest.fixture
def qslot(tmp_path, write_config, domains):
    """A qcow2 slot: an overlay on `golden` (MBR, partition 1 ext4 /marker 'golden') in the
    store, its domain defined with that overlay as a qcow2 disk."""
    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    di.qcow2_golden(str(images / "golden"), "golden", virtual="64M")
    disk = str(tmp_path / "slot.qcow2")
    di.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(images / "golden"), "-F",
           "qcow2", disk)
    name = domains.define(domains.name("qhold"), disk=disk, fmt="qcow2")
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    [vmim.vm.q]
    HostName = "{name}"
    HostDisk = "{disk}"
    partition = 1
    """)
    s = Slot(tmp_path, cfg, name, disk, str(tmp_path / "mnt" / name))
    yield s
    subprocess.run([sys.executable, "-m", "vmim", "--config", cfg, "-b", name, "--release"],
                   capture_output=True)
    assert hold.holders(disk) == []  # no holder process outlives the test


def test_a_qcow2_slot_is_held_by_its_export_daemon(vmim, qslot, domains, monkeypatch):
    """A qcow2 slot's export daemon takes QEMU's locks on the overlay: a domain started in the
    window fails, and after --mount it keeps failing until --release."""
    errors = start_in_the_window(monkeypatch, mounts, "mount", domains, qslot.name)
    r = vmim("-b", qslot.name, "--mount", "--config", qslot.cfg)
    assert r.code == 0, r
    assert errors and 'Failed to get "write" lock' in errors[0], errors
    monkeypatch.undo()
    assert 'Failed to get "write" lock' in start(domains, qslot.name)  # the command has ended
    assert read(os.path.join(qslot.mnt, "marker")) == "golden\n"
    assert vmim("-b", qslot.name, "--release", "--config", qslot.cfg).code == 0
    assert start(domains, qslot.name) == ""
    domains.conn.lookupByName(qslot.name).destroy()


def test_a_whole_disk_restore_holds_the_disk_it_replaces(vmim, slot, domains, monkeypatch):
    """--disk-image does not map the disk but copies over it: held the same way meanwhile."""
    from vmim.disk import qcow2

    cfg = open(slot.cfg).read().replace("[vmim.vm.s]", 'disk_image_format = "raw"\n[vmim.vm.s]')
    open(slot.cfg, "w").write(cfg)
    assert vmim("-b", slot.name, "-s", "whole", "--disk-image", "--config", slot.cfg).code == 0
    errors = start_in_the_window(monkeypatch, qcow2, "copy_raw", domains, slot.name)
    r = vmim("-b", slot.name, "-r", "whole", "--disk-image", "--config", slot.cfg)
    assert r.code == 0, r
    assert errors and 'Failed to get "write" lock' in errors[0], errors
    assert domains.state(slot.name) == 5
    assert fsck_clean(slot.disk)
