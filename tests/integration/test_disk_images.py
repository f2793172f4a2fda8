"""Whole-disk images: qcow2 overlay slots, --disk-image on raw slots, reflink resets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from tests.integration import diskimages as di
from tests.rig import storage_daemons
from vmim.disk import loop, mounts


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qemu_info(path):
    return json.loads(di.run("qemu-img", "info", "--output=json", "-U", path))


@pytest.fixture
def rig(tmp_path, write_config, domains):
    """A store holding `golden`: a qcow2 disk (20 GiB virtual) whose partition 1 is ext4 with
    /marker 'golden'; a qcow2 slot and a raw (kpartx) slot."""
    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    di.qcow2_golden(str(images / "golden"), "golden", raw=str(tmp_path / "raw.img"))
    di.run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "slot.qcow2"), "20G")
    names = {"q": domains.name("qcow2"), "r": domains.name("raw")}
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    [vmim.vm.q]
    HostName = "{names['q']}"
    HostDisk = "{tmp_path}/slot.qcow2"
    [vmim.vm.r]
    HostName = "{names['r']}"
    HostDisk = "{tmp_path}/raw.img"
    partition = 1
    """)
    return tmp_path, cfg, names, images


def test_restoring_a_qcow2_image_makes_an_overlay_on_it(vmim, rig):
    root, cfg, names, images = rig
    r = vmim("-b", names["q"], "-r", "golden", "--json", "--config", cfg)
    assert r.code == 0, r
    info = qemu_info(str(root / "slot.qcow2"))
    assert info["format"] == "qcow2" and info["virtual-size"] == 20 * 1024 ** 3
    assert os.path.realpath(info["full-backing-filename"]) == str(images / "golden")
    assert os.path.getsize(root / "slot.qcow2") < 1024 * 1024  # an overlay, not a copy
    boxes = {b["name"]: b for b in json.loads(vmim("-l", "--json", "--config", cfg).out)["boxes"]}
    assert os.path.realpath(boxes[names["q"]]["base"]) == str(images / "golden")
    (entry,) = json.loads(vmim("-L", "--json", "--config", cfg).out)["images"]
    assert entry["format"] == "qcow2" and entry["base_of"] == [names["q"]]


def test_storing_over_a_base_in_use_is_refused(vmim, rig):
    root, cfg, names, images = rig
    assert vmim("-b", names["q"], "-r", "golden", "--config", cfg).code == 0
    before = sha256(images / "golden")
    for box in (names["q"], names["r"]):
        flags = ["--disk-image"] if box == names["r"] else []
        r = vmim("-b", box, "-s", "golden", *flags, "--config", cfg)
        assert r.code == 4, r
        assert "is the base of the qcow2 overlay" in r.err and names["q"] in r.err
    assert sha256(images / "golden") == before
    assert sorted(os.listdir(images)) == ["golden"]


def test_store_flattens_a_qcow2_slot(vmim, rig):
    root, cfg, names, images = rig
    assert vmim("-b", names["q"], "-r", "golden", "--config", cfg).code == 0
    r = vmim("-b", names["q"], "-s", "flat", "--config", cfg)
    assert r.code == 0, r
    info = qemu_info(str(images / "flat"))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    res = subprocess.run(["qemu-img", "compare", "-U", str(images / "golden"),
                          str(images / "flat")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr  # identical content


def test_qcow2_slot_without_a_filesystem_refuses_trees_and_mounts(vmim, rig):
    """A tree restore goes into the slot's filesystem (through its FUSE export); an empty disk
    has none: refused, and the export is stopped again."""
    root, cfg, names, images = rig
    subprocess.run(["tar", "-czf", str(images / "tree.tgz"), "-C", str(root), "raw.img"],
                   check=True)
    for argv in (["-r", "tree.tgz"], ["--mount"]):
        r = vmim("-b", names["q"], *argv, "--config", cfg)
        assert r.code == 4, r
        assert "no filesystem found" in r.err
    assert storage_daemons() == set()
    assert mounts.mounted_at(str(root / "mnt" / names["q"])) is None


def test_disk_image_store_and_restore_of_a_raw_slot(vmim, rig):
    root, cfg, names, images = rig
    box = names["r"]
    r = vmim("-b", box, "--disk-image", "-s", "whole", "--config", cfg)
    assert r.code == 0, r
    assert qemu_info(str(images / "whole"))["format"] == "qcow2"
    assert vmim("-b", box, "--mount", "--config", cfg).code == 0
    with open(root / "mnt" / box / "marker", "w") as fh:
        fh.write("changed\n")
    r = vmim("-b", box, "--disk-image", "-r", "whole", "--mount", "--config", cfg)  # releases first
    assert r.code == 0, r
    assert (root / "mnt" / box / "marker").read_text() == "golden\n"
    assert vmim("-b", box, "--release", "--config", cfg).code == 0
    st = os.stat(root / "raw.img")
    assert st.st_blocks * 512 < st.st_size  # written sparsely
    assert loop.loops_backed_by(str(root / "raw.img")) == []


def test_reflink_reset_on_xfs(vmim, rig, tmp_path, write_config, domains):
    """A store and a slot on one xfs filesystem: raw disk images restore as reflink copies."""
    xfs_img = tmp_path / "xfs.img"
    di.sparse_file(str(xfs_img), 2 * 1024 ** 3)
    di.run("mkfs.xfs", "-q", "-m", "reflink=1", str(xfs_img))
    with di.attached(str(xfs_img)) as dev, di.mounted(dev) as fs:
        os.chmod(fs, 0o755)
        os.mkdir(os.path.join(fs, "images"))
        disk = os.path.join(fs, "slot.img")
        di.partitioned_image(disk, "dos", [24], ["ext4"])
        name = domains.name("reflink")
        cfg = write_config(f"""\
        [vmim.local]
        vmimages = "{fs}/images"
        mount = "{tmp_path}/mnt-reflink"
        lockdir = "{tmp_path}/locks"
        statedir = "{tmp_path}/state"
        disk_image_format = "raw"
        [vmim.vm.x]
        HostName = "{name}"
        HostDisk = "{disk}"
        partition = 1
        """)
        r = vmim("-b", name, "--disk-image", "-s", "snap", "--config", cfg)
        assert r.code == 0, r
        assert qemu_info(os.path.join(fs, "images", "snap"))["format"] == "raw"
        r = vmim("-b", name, "--disk-image", "-r", "snap", "--json", "--config", cfg)
        assert r.code == 0, r
        step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "restore")
        assert "(reflink)" in step["message"]
        extents = di.run("filefrag", "-v", disk)
        assert "shared" in extents
        assert mounts.mounted_at(str(tmp_path / "mnt-reflink" / name)) is None


def test_dry_run_of_a_qcow2_reset(vmim, rig):
    root, cfg, names, images = rig
    before = os.stat(root / "slot.qcow2").st_mtime_ns
    r = vmim("-b", names["q"], "-r", "golden", "--dry-run", "--config", cfg)
    assert r.code == 0, r
    assert "restore: replace the slot's disk with a new qcow2 overlay on image golden" in r.out
    assert ". mount" not in r.out  # a whole disk: no mount step
    assert os.stat(root / "slot.qcow2").st_mtime_ns == before
