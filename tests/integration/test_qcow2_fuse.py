"""File-level actions on qcow2 slots through a qemu-storage-daemon FUSE export: --mount,
--release, tree stores and restores, -i, -e; partitioned and not; a killed run's export cleaned
up by the next run; the base image never written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Dict

import pytest

from tests.integration import diskimages as di
from tests.integration.test_disk_images import sha256
from tests.rig import storage_daemons
from vmim.disk import fuse, loop, mounts


@dataclass
class Rig:
    root: object
    cfg: str
    names: Dict[str, str]
    disks: Dict[str, str]
    bases: Dict[str, str]
    images: object
    inserts: object

    def mnt(self, key: str) -> str:
        return str(self.root / "mnt" / self.names[key])

    def base_sums(self) -> Dict[str, str]:
        return {k: sha256(p) for k, p in self.bases.items()}


def _overlay(base: str, disk: str) -> None:
    di.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk)


@pytest.fixture
def rig(tmp_path, write_config, domains):
    """Two qcow2 slots, each an overlay on a base in the image store: `part` (an MBR disk,
    partition=1, ext4 with /marker 'golden') and `bare` (the ext4 filesystem on the whole disk,
    /marker 'bare')."""
    os.chmod(tmp_path, 0o755)
    images, inserts = tmp_path / "images", tmp_path / "inserts"
    images.mkdir()
    inserts.mkdir()
    di.qcow2_golden(str(images / "golden"), "golden", virtual="1G")
    di.filesystem_image(str(tmp_path / "bare.raw"), "ext4", 32, "bare")
    di.run("qemu-img", "convert", "-O", "qcow2", str(tmp_path / "bare.raw"), str(images / "bare"))
    os.unlink(tmp_path / "bare.raw")
    bases = {"part": str(images / "golden"), "bare": str(images / "bare")}
    disks = {k: str(tmp_path / f"{k}.qcow2") for k in bases}
    for k in bases:
        _overlay(bases[k], disks[k])
    names = {k: domains.name(k) for k in bases}
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    vminserts = "{inserts}"
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    [vmim.vm.part]
    HostName = "{names['part']}"
    HostDisk = "{disks['part']}"
    partition = 1
    [vmim.vm.bare]
    HostName = "{names['bare']}"
    HostDisk = "{disks['bare']}"
    """)
    r = Rig(tmp_path, cfg, names, disks, bases, images, inserts)
    yield r
    for k in names:  # a failed test must not leave the export running
        subprocess.run([sys.executable, "-m", "vmim", "--config", cfg, "-b", names[k],
                        "--release"], capture_output=True)


def run_ok(vmim, rig, *argv):
    r = vmim(*argv, "--config", rig.cfg)
    assert r.code == 0, r
    return r


def assert_nothing_left(rig: Rig, key: str) -> None:
    exp = fuse.export_for(rig.disks[key])
    assert fuse.daemon_pids(exp) == []
    assert fuse.fuse_mounts(exp) == []
    assert fuse.loops_on(exp) == []
    assert not os.path.lexists(exp.path) and not os.path.lexists(exp.pidfile)
    assert mounts.mounted_at(rig.mnt(key)) is None
    assert loop.loops_backed_by(rig.disks[key]) == []


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


@pytest.mark.parametrize("key,marker", [("part", "golden"), ("bare", "bare")])
def test_mount_writes_into_the_overlay_and_release_stops_the_export(vmim, rig, key, marker):
    sums = rig.base_sums()
    r = run_ok(vmim, rig, "-b", rig.names[key], "--mount", "--json")
    step = json.loads(r.out)["results"][0]["steps"][0]
    assert step["message"].startswith(f"mounted {rig.disks[key]}")
    exp = fuse.export_for(rig.disks[key])
    assert len(fuse.daemon_pids(exp)) == 1 and len(fuse.fuse_mounts(exp)) == 1
    assert read(os.path.join(rig.mnt(key), "marker")) == marker + "\n"
    with open(os.path.join(rig.mnt(key), "written"), "w") as fh:
        fh.write("into the overlay\n")
    r = run_ok(vmim, rig, "-b", rig.names[key], "--release", "--json")
    message = json.loads(r.out)["results"][0]["steps"][0]["message"]
    assert "unmounted" in message and "stopped qemu-storage-daemon" in message
    assert_nothing_left(rig, key)
    assert rig.base_sums() == sums
    # the write is in the slot's overlay, and there only
    run_ok(vmim, rig, "-b", rig.names[key], "--mount")
    assert read(os.path.join(rig.mnt(key), "written")) == "into the overlay\n"
    run_ok(vmim, rig, "-b", rig.names[key], "--release")
    assert_nothing_left(rig, key)


@pytest.mark.parametrize("flag,fmt", [("-z", "tgz"), ("-y", "rsync")])
def test_tree_store_and_restore_on_a_qcow2_slot(vmim, rig, flag, fmt):
    sums = rig.base_sums()
    box = rig.names["part"]
    run_ok(vmim, rig, "-b", box, "--mount")
    os.makedirs(os.path.join(rig.mnt("part"), "etc"), exist_ok=True)
    with open(os.path.join(rig.mnt("part"), "etc", "hostname"), "w") as fh:
        fh.write("stored\n")
    run_ok(vmim, rig, "-b", box, flag, "-s", "tree", "--release")
    assert_nothing_left(rig, "part")
    listed = {i["name"]: i for i in json.loads(run_ok(vmim, rig, "-L", "--json").out)["images"]}
    assert listed["tree"]["format"] == fmt
    # change the slot, then restore the tree into it (the overlay of the other slot's base)
    run_ok(vmim, rig, "-b", rig.names["bare"], "-r", "tree", "--release")
    assert_nothing_left(rig, "bare")
    run_ok(vmim, rig, "-b", rig.names["bare"], "--mount")
    assert read(os.path.join(rig.mnt("bare"), "marker")) == "golden\n"
    assert read(os.path.join(rig.mnt("bare"), "etc", "hostname")) == "stored\n"
    run_ok(vmim, rig, "-b", rig.names["bare"], "--release")
    assert rig.base_sums() == sums
    info = json.loads(di.run("qemu-img", "info", "--output=json", "-U", rig.disks["bare"]))
    assert os.path.realpath(info["full-backing-filename"]) == rig.bases["bare"]  # still an overlay


def test_store_without_a_format_flag_stays_a_whole_disk(vmim, rig):
    run_ok(vmim, rig, "-b", rig.names["part"], "-s", "whole")
    listed = {i["name"]: i for i in json.loads(run_ok(vmim, rig, "-L", "--json").out)["images"]}
    assert listed["whole"]["format"] == "qcow2"
    assert_nothing_left(rig, "part")


def test_insert_and_extract_on_a_qcow2_slot(vmim, rig):
    sums = rig.base_sums()
    box = rig.names["part"]
    src = rig.root / "certs"
    (src / "etc" / "ssl").mkdir(parents=True)
    (src / "etc" / "ssl" / "host.pem").write_text("certificate\n")
    with tarfile.open(rig.inserts / "certs", "w:gz") as t:
        t.add(src / "etc", arcname="etc")
    run_ok(vmim, rig, "-b", box, "-i", "certs", "--release")
    assert_nothing_left(rig, "part")
    run_ok(vmim, rig, "-b", box, "-e", "etc-{box}:/etc", "-z", "--release")  # extract runs first
    assert_nothing_left(rig, "part")
    with tarfile.open(rig.inserts / f"etc-{box}") as t:
        names = t.getnames()
    assert any(n.endswith("ssl/host.pem") for n in names), names
    run_ok(vmim, rig, "-b", box, "--mount")
    assert read(os.path.join(rig.mnt("part"), "etc", "ssl", "host.pem")) == "certificate\n"
    run_ok(vmim, rig, "-b", box, "--release")
    assert rig.base_sums() == sums


def test_a_running_domain_s_disk_is_never_exported(vmim, rig, domains):
    sums = rig.base_sums()
    other = domains.define(domains.name("user"), start=True, disk=rig.disks["part"])
    r = vmim("-b", rig.names["part"], "--mount", "--config", rig.cfg)
    assert r.code == 4, r
    assert "in use by running domain" in r.err and other in r.err
    r = vmim("-b", rig.names["part"], "-z", "-s", "tree", "--config", rig.cfg)
    assert r.code == 4, r
    assert storage_daemons() == set()
    # the slot's own domain running: refused until it is shut down
    domains.define(rig.names["bare"], start=True, disk=rig.disks["bare"])
    r = vmim("-b", rig.names["bare"], "--mount", "--config", rig.cfg)
    assert r.code == 4 and "domain is running" in r.err, r
    assert storage_daemons() == set()
    assert not os.path.exists(rig.root / "images" / "tree")
    domains.conn.lookupByName(other).destroy()
    domains.conn.lookupByName(rig.names["bare"]).destroy()
    assert rig.base_sums() == sums


def test_a_partition_the_disk_lacks_is_refused_and_released(vmim, rig, write_config):
    cfg = rig.cfg.replace(".cfg", "-p3.cfg")
    with open(rig.cfg) as fh, open(cfg, "w") as out:
        out.write(fh.read().replace("partition = 1", "partition = 3"))
    r = vmim("-b", rig.names["part"], "--mount", "--config", cfg)
    assert r.code == 4, r
    assert "has no partition 3" in r.err
    assert_nothing_left(rig, "part")


def test_leftovers_of_a_killed_mount_are_cleaned_by_the_next_run(vmim, rig):
    """A run killed between starting the export and mounting leaves the daemon and a loop
    device; the next --mount undoes them first, and says so."""
    exp = fuse.export_for(rig.disks["bare"])
    fuse.start(exp)
    left = loop.attach(exp.path)
    try:
        r = run_ok(vmim, rig, "-b", rig.names["bare"], "--mount")
        assert "cleaned up after an interrupted run" in r.err and left in r.err
        assert read(os.path.join(rig.mnt("bare"), "marker")) == "bare\n"
        run_ok(vmim, rig, "-b", rig.names["bare"], "--release")
    finally:
        fuse.stop(exp, "test")
    assert_nothing_left(rig, "bare")


def _wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def _unpacking(mnt):
    """Whether a restore's staging directory is at the slot's root (it is unpacking)."""
    if mounts.mounted_at(mnt) is None:
        return False
    try:
        return any(n.startswith(".vmim-restore.") for n in os.listdir(mnt))
    except OSError:
        return False


@pytest.mark.parametrize("key", ["part", "bare"])
def test_kill_9_mid_restore_then_release_leaves_nothing(vmim, rig, key):
    sums = rig.base_sums()
    # a tree that takes a while to unpack: many small files
    src = rig.root / "many"
    for i in range(40):
        d = src / f"d{i}"
        d.mkdir(parents=True)
        for j in range(100):
            (d / f"f{j}").write_bytes(os.urandom(64))
    subprocess.run(["tar", "-czf", str(rig.images / "many"), "-C", str(src), "."], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "vmim", "--config", rig.cfg,
                             "-b", rig.names[key], "-r", "many"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # killed while it unpacks (the clear may re-make the filesystem first: a kill inside
        # mkfs is another case, docs/safety.md)
        _wait_until(lambda: _unpacking(rig.mnt(key)))
        assert proc.poll() is None, "the restore ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    exp = fuse.export_for(rig.disks[key])
    assert fuse.daemon_pids(exp), "the killed run's export daemon runs on"
    r = run_ok(vmim, rig, "-b", rig.names[key], "--release", "--json")
    message = json.loads(r.out)["results"][0]["steps"][0]["message"]
    assert "stopped qemu-storage-daemon" in message
    assert_nothing_left(rig, key)
    assert storage_daemons() == set()
    assert rig.base_sums() == sums
    # the slot still works: the restore again, to the end
    run_ok(vmim, rig, "-b", rig.names[key], "-r", "many", "--release")
    run_ok(vmim, rig, "-b", rig.names[key], "--mount")
    assert len(os.listdir(os.path.join(rig.mnt(key), "d39"))) == 100
    run_ok(vmim, rig, "-b", rig.names[key], "--release")
    assert_nothing_left(rig, key)
    assert rig.base_sums() == sums
    res = subprocess.run(["qemu-img", "check", rig.disks[key]], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_of_a_tree_restore_into_a_qcow2_slot(vmim, rig):
    subprocess.run(["tar", "-czf", str(rig.images / "t.tgz"), "-C", str(rig.inserts), "."],
                   check=True)
    r = run_ok(vmim, rig, "-b", rig.names["part"], "-r", "t.tgz", "--dry-run")
    assert "qemu-storage-daemon FUSE export" in r.out
    assert "into a staging directory" in r.out
    r = run_ok(vmim, rig, "-b", rig.names["part"], "-r", "golden", "--dry-run")
    assert "new qcow2 overlay" in r.out and ". mount" not in r.out  # no mount step
    r = run_ok(vmim, rig, "-b", rig.names["part"], "-s", "x", "--zstd", "--dry-run")
    assert "(tar.zst)" in r.out and "FUSE export" in r.out
    assert storage_daemons() == set()


def test_the_export_daemon_of_a_slot_left_mounted_is_no_leftover_of_its_run(vmim, rig):
    """It outlives the --mount that started it, by design: it carries no owner tag of that
    run, so no later run takes it for what a killed run left (were it in another mount
    namespace, it would hold the slot's filesystem mounted there: reaped, the slot's disk
    gone from under its mount)."""
    from vmim import procscan

    run_ok(vmim, rig, "-b", rig.names["bare"], "--mount")
    exp = fuse.export_for(rig.disks["bare"])
    (pid,) = fuse.daemon_pids(exp)
    with open(f"/proc/{pid}/environ", "rb") as fh:
        assert procscan.OWNER_ENV.encode() + b"=" not in fh.read()
    assert procscan.reap_orphans([rig.mnt("bare"), exp.path]) == []
    assert fuse.daemon_pids(exp) == [pid]
    run_ok(vmim, rig, "-b", rig.names["bare"], "--release")
    assert_nothing_left(rig, "bare")


def test_release_after_the_export_daemon_itself_was_killed(vmim, rig):
    """A daemon killed by SIGKILL leaves its FUSE mount (dead: 'Transport endpoint is not
    connected') and its pidfile; --release unmounts and removes them."""
    exp = fuse.export_for(rig.disks["bare"])
    fuse.start(exp)
    (pid,) = fuse.daemon_pids(exp)
    os.kill(pid, signal.SIGKILL)
    _wait_until(lambda: not fuse.daemon_pids(exp))
    assert fuse.fuse_mounts(exp) and os.path.exists(exp.pidfile)
    r = run_ok(vmim, rig, "-b", rig.names["bare"], "--release")
    assert "unmounted the dead export" in r.err
    assert_nothing_left(rig, "bare")


def test_a_disk_another_qemu_holds_is_not_exported(vmim, rig):
    """A QEMU that libvirt does not know (here a second storage daemon) holds the image's write
    lock: the export refuses to start, exit 4, nothing left."""
    other = rig.root / "other.raw"
    other.write_bytes(b"")
    holder = fuse.Export(rig.disks["bare"], str(other), str(rig.root / "other.pid"))
    di.run(*fuse.daemon_argv(holder))
    try:
        r = vmim("-b", rig.names["bare"], "--mount", "--config", rig.cfg)
        assert r.code == 4, r
        assert "in use by another process" in r.err and "lock" in r.err
        assert fuse.daemon_pids(fuse.export_for(rig.disks["bare"])) == []
        assert mounts.mounted_at(rig.mnt("bare")) is None
    finally:
        fuse.stop(holder, "test")
    assert_nothing_left(rig, "bare")
