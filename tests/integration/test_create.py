"""A slot from its config alone: a disk file that does not exist yet, with `disksize`, is made
by the first action that needs it (real files, sfdisk, loop devices, mkfs); what cannot be
made is refused before anything is made."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

SLOT = """\
[vmim.local]
vmimages = "{d}/images"
lockdir = "{d}/locks"
statedir = "{d}/state"
mount = "{d}/mnt"
[vmim.vm.new1]
HostName = "{name}"
HostDisk = "{disk}"
{extra}
"""


@pytest.fixture
def site(tmp_path, write_config):
    images = tmp_path / "images"
    images.mkdir()
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("golden\n")
    with tarfile.open(images / "golden", "w:gz") as tf:
        tf.add(str(src), arcname=".")

    def make(extra="partition = 1\ndisksize = \"64M\"", disk=None, name="vmim-new1"):
        disk = disk or str(tmp_path / "disks" / "new1.img")
        return disk, write_config(SLOT.format(d=tmp_path, name=name, disk=disk, extra=extra))

    (tmp_path / "disks").mkdir()
    return make


def _fs_of(disk, offset):
    out = subprocess.run(["blkid", "-p", "-O", str(offset), "-o", "export", disk],
                         capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_restore_into_a_slot_whose_disk_does_not_exist_makes_it(vmim, site):
    disk, cfg = site()
    dry = vmim("-b", "vmim-new1", "-r", "golden", "--release", "--dry-run", "--json",
               "--config", cfg)
    assert dry.code == 0, dry
    steps = [s["step"] for s in json.loads(dry.out)["plan"]["vmim-new1"]["steps"]]
    assert steps == ["verify", "create", "mount", "restore", "release"]
    assert not os.path.exists(disk)  # the dry run made nothing

    r = vmim("-b", "vmim-new1", "-r", "golden", "--release", "--config", cfg)
    assert r.code == 0, r
    st = os.stat(disk)
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 16 << 20  # sparse
    table = json.loads(subprocess.run(["sfdisk", "--json", disk], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos" and len(table["partitions"]) == 1
    start = table["partitions"][0]["start"] * 512
    assert _fs_of(disk, start).get("TYPE") == "ext4"
    # the image is in it: mount and look
    r = vmim("-b", "vmim-new1", "--mount", "--config", cfg)
    assert r.code == 0, r
    try:
        mnt = os.path.join(os.path.dirname(os.path.dirname(disk)), "mnt", "vmim-new1")
        with open(os.path.join(mnt, "etc", "hostname")) as fh:
            assert fh.read() == "golden\n"
    finally:
        assert vmim("-b", "vmim-new1", "--release", "--config", cfg).code == 0
    # a second run finds the disk there and makes nothing
    dry = vmim("-b", "vmim-new1", "-r", "golden", "--dry-run", "--json", "--config", cfg)
    assert "create" not in [s["step"] for s in json.loads(dry.out)["plan"]["vmim-new1"]["steps"]]


def test_a_stored_image_s_filesystem_type_is_what_a_new_disk_gets(vmim, site, tmp_path):
    """xfs slot stored, restored into a new slot: the new disk is xfs."""
    xfs = tmp_path / "disks" / "x.img"
    subprocess.run(["truncate", "-s", "320M", str(xfs)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(xfs)], check=True)
    disk, cfg = site(extra='partition = 1\ndisksize = "320M"')  # xfs needs 300 MB
    with open(cfg, "a") as fh:
        fh.write(f'[vmim.vm.x]\nHostName = "vmim-x"\nroot = "{xfs}"\n')
    assert vmim("-b", "vmim-x", "--zstd", "-s", "from-xfs", "--release",
                "--config", cfg).code == 0
    r = vmim("-b", "vmim-new1", "-r", "from-xfs", "--release", "--config", cfg)
    assert r.code == 0, r
    assert "an xfs filesystem" in r.err
    assert _fs_of(disk, 1 << 20).get("TYPE") == "xfs"
    # a making that fails half-way (mkfs.xfs refuses 64 MiB) leaves nothing, under no name
    small = tmp_path / "disks" / "small.img"
    with open(cfg, "a") as fh:
        fh.write(f'[vmim.vm.s]\nHostName = "vmim-small"\nroot = "{small}"\ndisksize = "64M"\n')
    r = vmim("-b", "vmim-small", "-r", "from-xfs", "--config", cfg)
    assert r.code == 6, r
    assert "mkfs.xfs" in r.err
    assert not small.exists()
    assert not [n for n in os.listdir(small.parent) if ".vmim-new" in n]
    assert not subprocess.run(["losetup", "-j", str(small)], capture_output=True,
                              text=True).stdout


@pytest.mark.parametrize("case", ["no disksize", "parent missing", "block device",
                                  "partition 2", "too small"])
def test_a_disk_that_cannot_be_made_is_refused_before_anything_is_made(vmim, site, tmp_path,
                                                                       case):
    extra, disk, words = 'partition = 1\ndisksize = "64M"', None, ""
    if case == "no disksize":
        extra, words = "partition = 1", "set disksize"
    elif case == "parent missing":
        disk, words = str(tmp_path / "nowhere" / "new1.img"), "directory"
    elif case == "block device":
        disk, words = "/dev/vmim-test-no-such-device", "never block devices"
    elif case == "partition 2":
        extra, words = 'partition = 2\ndisksize = "64M"', "set partition = 1"
    disk, cfg = site(extra=extra, disk=disk)
    image = "golden"
    if case == "too small":  # an image whose recorded data is bigger than the new disk
        meta_src = tmp_path / "disks" / "big.img"
        subprocess.run(["truncate", "-s", "96M", str(meta_src)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(meta_src)], check=True)
        with open(cfg, "a") as fh:
            fh.write(f'[vmim.vm.big]\nHostName = "vmim-big"\nroot = "{meta_src}"\n')
        assert vmim("-b", "vmim-big", "--mount", "--config", cfg).code == 0
        mnt = tmp_path / "mnt" / "vmim-big"
        subprocess.run(["dd", "if=/dev/urandom", f"of={mnt}/blob", "bs=1M", "count=70",
                        "status=none"], check=True)
        assert vmim("-b", "vmim-big", "--zstd", "-s", "big", "--release",
                    "--config", cfg).code == 0
        image, words = "big", "smaller than the image's data"
    dry = vmim("-b", "vmim-new1", "-r", image, "--dry-run", "--config", cfg)
    assert dry.code == 4, dry
    r = vmim("-b", "vmim-new1", "-r", image, "--config", cfg)
    assert r.code == 4, r
    assert words in r.err
    assert not os.path.exists(disk)
    assert [n for n in os.listdir(os.path.dirname(disk)) if ".vmim-new" in n] == [] \
        if os.path.isdir(os.path.dirname(disk)) else True


def test_a_qcow2_slot_s_missing_disk_is_made_as_qcow2(vmim, site, tmp_path):
    disk = str(tmp_path / "disks" / "new1.qcow2")
    disk, cfg = site(extra='partition = 1\ndisksize = "64M"', disk=disk)
    r = vmim("-b", "vmim-new1", "-r", "golden", "--release", "--config", cfg)
    assert r.code == 0, r
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", disk],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    assert "backing-filename" not in info
    r = vmim("-b", "vmim-new1", "--mount", "--config", cfg)
    assert r.code == 0, r
    try:
        mnt = tmp_path / "mnt" / "vmim-new1"
        assert (mnt / "etc" / "hostname").read_text() == "golden\n"
    finally:
        assert vmim("-b", "vmim-new1", "--release", "--config", cfg).code == 0
