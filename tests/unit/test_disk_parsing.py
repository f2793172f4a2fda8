"""Parsers of sfdisk, kpartx, losetup and mountinfo output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from vmim.disk import kpartx, loop, mounts

HERE = os.path.dirname(__file__)


def recorded(name: str) -> str:
    with open(os.path.join(HERE, "recorded", name)) as fh:
        return fh.read()


def test_kpartx_list_output_of_an_image():
    assert kpartx.parse_kpartx(recorded("kpartx-l-image.txt")) == {
        1: "/dev/mapper/loop0vmim1", 2: "/dev/mapper/loop0vmim2", 3: "/dev/mapper/loop0vmim3"}


def test_kpartx_add_output_of_a_device_whose_name_has_digits():
    assert kpartx.parse_kpartx(recorded("kpartx-av-device.txt")) == {
        1: "/dev/mapper/virt-hudson_slave_vm01vmim1", 2: "/dev/mapper/virt-hudson_slave_vm01vmim2"}


def test_kpartx_noise_lines_are_ignored():
    # kpartx 0.9 prints this when it detaches its temporary loop device (the 0.3.15 parsing bug)
    text = "loop deleted : /dev/loop0\n" + recorded("kpartx-l-image.txt")
    assert sorted(kpartx.parse_kpartx(text)) == [1, 2, 3]
    assert kpartx.parse_kpartx("") == {}


def test_sfdisk_json_with_logical_partitions(tmp_path):
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk not installed (make test installs it)")
    img = tmp_path / "disk.img"
    with open(img, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    script = "label: dos\n,8M,L\n,,E\n,8M,L\n,8M,L\n"
    subprocess.run(["sfdisk", "-q", str(img)], input=script.encode(), check=True)
    parts = kpartx.parse_sfdisk(subprocess.run(["sfdisk", "--json", str(img)], check=True,
                                               capture_output=True).stdout.decode())
    assert [p.number for p in parts] == [1, 2, 5, 6]
    assert parts[0].start == 2048 * 512 and parts[0].size == 8 * 1024 * 1024


def test_sfdisk_json_of_a_4k_sector_device():
    text = json.dumps({"partitiontable": {"label": "gpt", "sectorsize": 4096, "partitions": [
        {"node": "/dev/nvme0n1p1", "start": 256, "size": 1000},
        {"node": "/dev/nvme0n1p12", "start": 2000, "size": 10}]}})
    parts = kpartx.parse_sfdisk(text)
    assert [(p.number, p.start, p.size) for p in parts] == [(1, 256 * 4096, 1000 * 4096),
                                                            (12, 2000 * 4096, 10 * 4096)]


def test_losetup_json():
    text = json.dumps({"loopdevices": [
        {"name": "/dev/loop0", "back-file": "/srv/a b.img", "back-ino": 12,
         "back-maj:min": "     254:0  ", "offset": 1048576, "sizelimit": 16777216},
        {"name": "/dev/loop1", "back-file": "/srv/gone.img (deleted)", "back-ino": 13,
         "back-maj:min": "254:0", "offset": 0, "sizelimit": 0}]})
    loops = loop.parse_list(text)
    assert loops[0].back_file == "/srv/a b.img" and loops[0].back_dev == os.makedev(254, 0)
    assert loops[0].offset == 1048576 and loops[0].back_ino == 12
    assert loops[1].back_file == "/srv/gone.img"
    assert loop.parse_list("") == []


def test_mountinfo_unescapes_spaces_and_newlines():
    text = ("36 35 98:0 / /mnt/vm/web\\0401 rw,noatime master:1 - ext4 /dev/loop0 rw\n"
            "37 35 7:1 / /mnt/odd\\012name rw shared:2 - xfs /dev/loop1 rw,nouuid\n"
            "38 35 0:45 /sub /mnt/vm/web\\0401/proc rw - proc proc rw\n")
    ms = mounts.parse_mountinfo(text)
    assert ms[0].target == "/mnt/vm/web 1" and ms[0].devno == os.makedev(98, 0)
    assert ms[0].fstype == "ext4" and ms[0].source == "/dev/loop0"
    assert ms[1].target == "/mnt/odd\nname" and ms[1].fstype == "xfs"
    assert ms[1].super_options == ("rw", "nouuid") and ms[0].super_options == ("rw",)
    below = mounts.mounts_at("/mnt/vm/web 1", ms)
    assert [m.target for m in below] == ["/mnt/vm/web 1/proc", "/mnt/vm/web 1"]  # deepest first


def test_root_naming_a_partitioned_disk_says_to_use_hostdisk_and_partition(tmp_path):
    """`root = "/x.img"` on a disk with a partition table said only "no filesystem found
    (unknown or corrupt)"."""
    from vmim import disk
    from vmim.errors import StateError

    if shutil.which("sfdisk") is None or shutil.which("blkid") is None:
        pytest.skip("sfdisk and blkid (fdisk, util-linux) are needed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(4 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: dos\n,,L\n", text=True, check=True)
    with pytest.raises(StateError) as exc:
        disk.probe_filesystem(str(image), str(image))
    assert exc.value.exit_code == 4
    assert str(exc.value) == (f"{image}: holds a partition table (dos), not a filesystem: name "
                              "such a disk with HostDisk and partition = N (the partition "
                              "holding the root filesystem), not with root")
