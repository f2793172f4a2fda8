"""--mount and --release on real images: MBR, GPT, bare ext4 and xfs files, block devices;
refusals, bad input, crashes, busy mounts and concurrent commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import table_rows
from tests.integration import diskimages as di
from vmim import lock
from vmim.disk import loop, mounts

XFS_MIB = 320  # mkfs.xfs wants at least 300 MiB


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Images built once per module; tests work on sparse copies."""
    d = tmp_path_factory.mktemp("golden")
    os.chmod(d, 0o755)
    di.partitioned_image(str(d / "mbr.img"), "dos", [16, 24, 16], ["ext4", "ext4", "ext2"])
    di.partitioned_image(str(d / "gpt.img"), "gpt", [16, 24, 16], ["ext4", "ext4", None])
    di.filesystem_image(str(d / "bare-ext4.img"), "ext4", 24, "bare ext4")
    di.filesystem_image(str(d / "bare-xfs.img"), "xfs", XFS_MIB, "bare xfs")
    di.sparse_file(str(d / "blank.img"), 24 * di.MiB)
    return d


@pytest.fixture
def host(tmp_path, golden, write_config, domains):
    """A config with one slot per kind of disk, on copies of the golden images."""
    os.chmod(tmp_path, 0o755)
    for name in ("mbr.img", "gpt.img", "bare-ext4.img", "bare-xfs.img", "blank.img"):
        subprocess.run(["cp", "--sparse=always", str(golden / name), str(tmp_path / name)],
                       check=True)
    names = {k: domains.name(k) for k in ("mbr", "gpt", "ext4", "xfs", "blank", "nopart")}
    cfg = write_config(f"""\
    [vmim.local]
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    [vmim.vm.mbr]
    HostName = "{names['mbr']}"
    HostDisk = "{tmp_path}/mbr.img"
    partition = 2
    [vmim.vm.gpt]
    HostName = "{names['gpt']}"
    HostDisk = "{tmp_path}/gpt.img"
    partition = 2
    [vmim.vm.ext4]
    HostName = "{names['ext4']}"
    root = "{tmp_path}/bare-ext4.img"
    [vmim.vm.xfs]
    HostName = "{names['xfs']}"
    HostDisk = "{tmp_path}/bare-xfs.img"
    [vmim.vm.blank]
    HostName = "{names['blank']}"
    root = "{tmp_path}/blank.img"
    [vmim.vm.nopart]
    HostName = "{names['nopart']}"
    HostDisk = "{tmp_path}/bare-ext4-copy.img"
    partition = 1
    """)
    return Host(tmp_path, cfg, names)


class Host:
    def __init__(self, root, cfg, names):
        self.root = root
        self.cfg = cfg
        self.names = names

    def mountpoint(self, key):
        return str(self.root / "mnt" / self.names[key])

    def disk(self, key):
        return str(self.root / {"mbr": "mbr.img", "gpt": "gpt.img", "ext4": "bare-ext4.img",
                                "xfs": "bare-xfs.img", "blank": "blank.img"}[key])

    def cli(self, *argv):
        return [sys.executable, "-m", "vmim", "--config", self.cfg, *argv]


def single_slot(write_config, workdir, name, local=None, **keys):
    """A config with one slot `name` (locks under workdir); keys are slot keys as in the INI."""
    lines = ["[vmim.local]", f'lockdir = "{workdir}/locks"', f'statedir = "{workdir}/state"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in (local or {}).items()]
    lines += ["[vmim.vm.x]", f'HostName = "{name}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return write_config("\n".join(lines) + "\n")


def assert_released(host, key):
    assert mounts.mounted_at(host.mountpoint(key)) is None
    assert loop.loops_backed_by(host.disk(key)) == []


@pytest.mark.parametrize("key,marker,fstype", [
    ("mbr", "partition 2", "ext4"),
    ("gpt", "partition 2", "ext4"),
    ("ext4", "bare ext4", "ext4"),
    ("xfs", "bare xfs", "xfs"),
])
def test_mount_then_release(vmim, host, key, marker, fstype):
    box = host.names[key]
    r = vmim("-b", box, "--mount", "-v", "--config", host.cfg)
    assert r.code == 0, r
    mp = host.mountpoint(key)
    with open(os.path.join(mp, "marker")) as fh:
        assert fh.read() == marker + "\n"
    m = mounts.mounted_at(mp)
    assert m is not None and m.fstype == fstype
    assert len(loop.loops_backed_by(host.disk(key))) == 1
    assert "mounted" in r.err and fstype in r.err  # the step line at -v

    rows = {row[0]: row for row in table_rows(vmim("-l", "--config", host.cfg).out)}
    assert rows[box][3] == "yes"  # MOUNTED

    r = vmim("-b", box, "--release", "--config", host.cfg)
    assert r.code == 0, r
    assert_released(host, key)
    r = vmim("-b", box, "--release", "--config", host.cfg)  # idempotent
    assert r.code == 0, r


def test_mount_twice_is_one_mount(vmim, host):
    box = host.names["mbr"]
    assert vmim("-b", box, "--mount", "--config", host.cfg).code == 0
    r = vmim("-b", box, "--mount", "-v", "--config", host.cfg)
    assert r.code == 0 and "already mounted" in r.err
    assert len(mounts.mounts_at(host.mountpoint("mbr"))) == 1
    assert len(loop.loops_backed_by(host.disk("mbr"))) == 1
    assert vmim("-b", box, "--release", "--config", host.cfg).code == 0
    assert_released(host, "mbr")


def test_mount_and_release_in_one_command(vmim, host):
    box = host.names["gpt"]
    r = vmim("-b", box, "--release", "--mount", "--config", host.cfg)  # order of flags is irrelevant
    assert r.code == 0, r
    assert_released(host, "gpt")


def test_several_boxes_in_one_command(vmim, host):
    boxes = [host.names["mbr"], host.names["ext4"]]
    r = vmim("-b", boxes[0], "-b", boxes[1], "--mount", "--json", "--config", host.cfg)
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert [x["box"] for x in doc["results"]] == boxes
    assert all(x["steps"][0]["status"] == "ok" for x in doc["results"])
    r = vmim("-b", boxes[0], "-b", boxes[1], "--release", "--config", host.cfg)
    assert r.code == 0
    assert_released(host, "mbr")
    assert_released(host, "ext4")


def test_block_device_lvm_slot(vmim, host, write_config, domains):
    """An lvm slot whose logical volume is a real block device (a loop device stands in for
    the LV: device-mapper does not exist here), mounted directly without a mapping."""
    with di.attached(host.disk("ext4")) as dev:
        name = domains.name("lvm")
        cfg = single_slot(write_config, host.root, name, store_type="lvm", root=dev,
                          mount=f"{host.root}/mnt-lvm")
        r = vmim("-b", name, "--mount", "--config", cfg)
        assert r.code == 0, r
        assert open(f"{host.root}/mnt-lvm/marker").read() == "bare ext4\n"
        # the filesystem of a block device mounted elsewhere is refused for a second slot path
        assert vmim("-b", name, "--release", "--config", cfg).code == 0
        assert mounts.mounted_at(f"{host.root}/mnt-lvm") is None
        assert os.path.exists(dev)  # the device itself is not ours to detach


def test_missing_logical_volume_names_lvchange(vmim, write_config, tmp_path, domains):
    name = domains.name("lvmiss")
    cfg = single_slot(write_config, tmp_path, name, LvmVolumeGroup="vmimtestvg")
    r = vmim("-b", name, "--mount", "--config", cfg)
    assert r.code == 4, r
    assert f"/dev/vmimtestvg/{name}" in r.err and "lvchange -ay" in r.err


# ------------------------------------------------------------------ refusals


def test_mount_refused_while_the_domain_runs(vmim, host, domains):
    box = host.names["mbr"]
    domains.define(box, disk=host.disk("mbr"), start=True)
    r = vmim("-b", box, "--mount", "--config", host.cfg)
    assert r.code == 4, r
    assert "domain is running" in r.err and "add -d" in r.err
    assert_released(host, "mbr")


def test_mount_refused_while_another_domain_uses_the_disk(vmim, host, domains):
    other = domains.define(domains.name("intruder"), disk=host.disk("ext4"), start=True)
    r = vmim("-b", host.names["ext4"], "--mount", "--config", host.cfg)
    assert r.code == 4, r
    assert other in r.err and "in use by running domain" in r.err
    assert_released(host, "ext4")


def test_mount_refused_when_mounted_elsewhere(vmim, host):
    with di.attached(host.disk("ext4")) as dev, di.mounted(dev) as elsewhere:
        r = vmim("-b", host.names["ext4"], "--mount", "--config", host.cfg)
        assert r.code == 4, r
        assert f"already mounted at {elsewhere}" in r.err
        assert mounts.mounted_at(host.mountpoint("ext4")) is None
        # release will not pretend the disk is free while it is mounted elsewhere
        r = vmim("-b", host.names["ext4"], "--release", "--config", host.cfg)
        assert r.code == 8, r
        assert elsewhere in r.err and f"umount {elsewhere}" in r.err


# ------------------------------------------------------------------ bad input


def test_missing_disk_file(vmim, host):
    os.unlink(host.disk("mbr"))
    r = vmim("-b", host.names["mbr"], "--mount", "--config", host.cfg)
    assert r.code == 4, r
    assert "does not exist" in r.err and "mbr.img" in r.err


def test_partition_beyond_the_table(vmim, host, write_config, domains):
    name = domains.name("p9")
    cfg = single_slot(write_config, host.root, name, HostDisk=host.disk("mbr"), partition=9)
    r = vmim("-b", name, "--mount", "--config", cfg)
    assert r.code == 4, r
    assert "has no partition 9 (it has 1, 2, 3)" in r.err
    assert_released(host, "mbr")


def test_partition_of_a_disk_without_a_table(vmim, host):
    shutil.copy(host.disk("ext4"), host.root / "bare-ext4-copy.img")
    r = vmim("-b", host.names["nopart"], "--mount", "--config", host.cfg)
    assert r.code == 4, r
    assert "has no partition table" in r.err
    assert loop.loops_backed_by(str(host.root / "bare-ext4-copy.img")) == []


def test_partition_without_a_filesystem(vmim, host, write_config, domains):
    name = domains.name("nofs")
    cfg = single_slot(write_config, host.root, name, HostDisk=host.disk("gpt"), partition=3,
                      mount=f"{host.root}/mnt-nofs")
    r = vmim("-b", name, "--mount", "--config", cfg)
    assert r.code == 4, r
    assert "no filesystem found" in r.err
    assert loop.loops_backed_by(host.disk("gpt")) == []


def test_unknown_filesystem_in_a_blank_file(vmim, host):
    with open(host.disk("blank"), "r+b") as fh:
        fh.write(os.urandom(1024 * 1024))
    r = vmim("-b", host.names["blank"], "--mount", "--config", host.cfg)
    assert r.code == 4, r
    assert "no filesystem found" in r.err
    assert_released(host, "blank")


def test_corrupt_filesystem(vmim, host):
    # Keep the ext4 superblock magic (blkid still says ext4) but wreck the group descriptors.
    with open(host.disk("ext4"), "r+b") as fh:
        fh.seek(2048)
        fh.write(b"\xff" * 64 * 1024)
    r = vmim("-b", host.names["ext4"], "--mount", "--config", host.cfg)
    assert r.code == 6, r
    assert "mount -t ext4" in r.err and "Structure needs cleaning" in r.err and "fsck" in r.err
    assert_released(host, "ext4")


def test_no_free_loop_device(vmim, host, tmp_path, monkeypatch):
    """This kernel creates loop devices on demand, so exhaustion cannot happen here: a stand-in
    `losetup` answers `--find` with util-linux's message; everything else is the real one."""
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("losetup")
    (fake / "losetup").write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --find "*) echo "losetup: cannot find an unused loop device" >&2; exit 1;; esac\n'
        f'exec {real} "$@"\n')
    os.chmod(fake / "losetup", 0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    r = vmim("-b", host.names["mbr"], "--mount", "--config", host.cfg)
    assert r.code == 7, r
    assert "no free loop device" in r.err and "cannot find an unused loop device" in r.err
    assert_released(host, "mbr")


# ------------------------------------------------------------------ crashes, busy, locks


def test_release_after_sigkill_cleans_the_host(host):
    box = host.names["mbr"]
    # 1. a run killed at an arbitrary point once its loop device exists
    proc = subprocess.Popen(host.cli("-b", box, "--mount"), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if loop.loops_backed_by(host.disk("mbr")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2. what a crash between attach and mount leaves: a second, unmounted loop device
    part = [p for p in json.loads(di.run("sfdisk", "--json", host.disk("mbr")))
            ["partitiontable"]["partitions"]][1]
    di.run("losetup", "--find", "--offset", str(part["start"] * 512), host.disk("mbr"))
    assert loop.loops_backed_by(host.disk("mbr"))

    res = subprocess.run(host.cli("-b", box, "--release"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert_released(host, "mbr")


def test_busy_mount_exits_8_naming_the_holder(vmim, host, monkeypatch):
    monkeypatch.setattr(mounts, "UMOUNT_RETRY_DELAYS", (0.1, 0.1))
    box = host.names["ext4"]
    assert vmim("-b", box, "--mount", "--config", host.cfg).code == 0
    mp = host.mountpoint("ext4")
    sleeper = subprocess.Popen(["sleep", "60"], cwd=mp)
    try:
        r = vmim("-b", box, "--release", "--config", host.cfg)
        assert r.code == 8, r
        assert f"pid {sleeper.pid} (sleep" in r.err
        assert f"vmimagemanager -b {box} --release" in r.err
        assert mounts.mounted_at(mp) is not None  # nothing was torn down half-way
    finally:
        sleeper.kill()
        sleeper.wait()
    r = vmim("-b", box, "--release", "--config", host.cfg)
    assert r.code == 0, r
    assert_released(host, "ext4")


def test_locked_slot_exits_5_naming_the_holder_and_waits_with_lock_wait(vmim, host):
    box = host.names["gpt"]
    lockdir = str(host.root / "locks")
    with lock.slot_lock(lockdir, box):
        r = vmim("-b", box, "--mount", "--config", host.cfg)
        assert r.code == 5, r
        assert f"locked by pid {os.getpid()}" in r.err
        rows = table_rows(vmim("-m", "--config", host.cfg).out)
        assert rows == [(box, str(os.getpid()), rows[0][2])]
        assert box not in vmim("-f", "--config", host.cfg).out.split()
    assert mounts.mounted_at(host.mountpoint("gpt")) is None

    holder = threading.Thread(target=_hold, args=(lockdir, box, 1.0))
    holder.start()
    time.sleep(0.2)
    r = vmim("-b", box, "--mount", "--lock-wait", "20", "--config", host.cfg)
    holder.join()
    assert r.code == 0, r
    assert vmim("-b", box, "--release", "--config", host.cfg).code == 0
    assert_released(host, "gpt")


def _hold(lockdir, box, seconds):
    with lock.slot_lock(lockdir, box):
        time.sleep(seconds)


def test_concurrent_mounts_of_one_slot_never_mount_twice(host):
    box = host.names["mbr"]
    procs = [subprocess.Popen(host.cli("-b", box, "--mount"), stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    codes = [p.wait() for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert all(c in (0, 5) for c in codes), (codes, errs)
    assert 0 in codes
    assert len(mounts.mounts_at(host.mountpoint("mbr"))) == 1
    assert len(loop.loops_backed_by(host.disk("mbr"))) == 1
    res = subprocess.run(host.cli("-b", box, "--release"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert_released(host, "mbr")


def test_list_free_excludes_mounted_running_and_unconfigured(vmim, host, domains):
    domains.define(host.names["xfs"], start=True)
    stranger = domains.define(domains.name("stranger"))
    assert vmim("-b", host.names["mbr"], "--mount", "--config", host.cfg).code == 0
    try:
        free = vmim("-f", "--config", host.cfg).out.split()
        assert host.names["gpt"] in free and host.names["ext4"] in free
        assert host.names["mbr"] not in free  # mounted
        assert host.names["xfs"] not in free  # running
        assert stranger not in free  # not configured
        doc = json.loads(vmim("-f", "--json", "--config", host.cfg).out)
        assert doc["free"] == free
    finally:
        assert vmim("-b", host.names["mbr"], "--release", "--config", host.cfg).code == 0


def test_kpartx_mapper_without_device_mapper_fails_cleanly(vmim, host, write_config, domains):
    """mapper = "kpartx" on a kernel without device-mapper (these machines): kpartx itself
    runs and fails; the error says why and nothing is left attached."""
    if shutil.which("kpartx") is None:
        pytest.skip("kpartx not installed (make test installs it)")
    with open("/proc/misc") as fh:
        has_dm = "device-mapper" in fh.read()
    if has_dm:
        pytest.skip("this host has device-mapper; the test is for hosts without it")
    name = domains.name("kpartx")
    cfg = single_slot(write_config, host.root, name, local={"mapper": "kpartx"},
                      HostDisk=host.disk("gpt"), partition=2)
    r = vmim("-b", name, "--mount", "--config", cfg)
    assert r.code == 6, r
    assert "kpartx" in r.err and "device-mapper" in r.err
    assert loop.loops_backed_by(host.disk("gpt")) == []
    assert vmim("-b", name, "--release", "--config", cfg).code == 0


def test_lvm_slot_with_a_partition_table(vmim, host, write_config, domains):
    """A logical volume carrying a partition table (a loop device over the MBR image stands in
    for the LV): partition 2 is mapped through a second loop device at its offset."""
    with di.attached(host.disk("mbr")) as dev:
        name = domains.name("lvmpart")
        cfg = single_slot(write_config, host.root, name, store_type="lvm", root=dev, partition=2,
                          mount=f"{host.root}/mnt-lvmpart")
        r = vmim("-b", name, "--mount", "--config", cfg)
        assert r.code == 0, r
        assert open(f"{host.root}/mnt-lvmpart/marker").read() == "partition 2\n"
        assert len(loop.loops_backed_by(dev)) == 1
        assert vmim("-b", name, "--release", "--config", cfg).code == 0
        assert loop.loops_backed_by(dev) == []
        assert mounts.mounted_at(f"{host.root}/mnt-lvmpart") is None


def test_disk_actions_need_root(host, tmp_path):
    """As an ordinary user --mount exits 7 before touching anything."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          *host.cli("-b", host.names["ext4"], "--mount")],
                         capture_output=True, text=True, cwd="/")
    assert res.returncode == 7, res.stderr
    assert "mount needs root" in res.stderr
    assert_released(host, "ext4")


def test_mount_cleans_mappings_a_killed_run_left(vmim, host):
    """A crash between attach and mount leaves a loop device; the next --mount reuses nothing
    stale: it detaches the leftover, maps afresh, and the host has one mapping."""
    part = json.loads(di.run("sfdisk", "--json", host.disk("mbr")))["partitiontable"]["partitions"][1]
    di.run("losetup", "--find", "--offset", str(part["start"] * 512), host.disk("mbr"))
    r = vmim("-b", host.names["mbr"], "--mount", "--config", host.cfg)
    assert r.code == 0, r
    assert "cleaned up after an interrupted run" in r.err
    assert len(loop.loops_backed_by(host.disk("mbr"))) == 1
    assert vmim("-b", host.names["mbr"], "--release", "--config", host.cfg).code == 0
    assert_released(host, "mbr")


def test_release_of_a_block_device_slot_mounted_elsewhere_exits_8(vmim, host, write_config,
                                                                  domains):
    """A slot whose disk is a block device, mounted by hand elsewhere: release must not report
    it free (and so -u must not boot it)."""
    with di.attached(host.disk("ext4")) as dev, di.mounted(dev) as elsewhere:
        name = domains.name("blkbusy")
        cfg = single_slot(write_config, host.root, name, store_type="lvm", root=dev)
        r = vmim("-b", name, "--release", "--config", cfg)
        assert r.code == 8, r
        assert f"umount {elsewhere}" in r.err
