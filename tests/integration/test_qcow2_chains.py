"""qcow2 images name other files (a backing file, an external data file): a restore, a qcow2
slot's reset and a --disk-image restore use only images whose every named file is a regular
file inside the image store, checked level by level before anything opens it (issue 20,
finding 5). Otherwise the slot's disk would stand on a host file: the guest reads it, and
writes it through a data file."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.integration import diskimages as di
from tests.integration.test_disk_images import qemu_info, rig, sha256  # noqa: F401


@pytest.fixture
def chains(rig):  # noqa: F811 — the rig fixture of test_disk_images
    """test_disk_images' rig (a store with `golden`, a qcow2 slot `q`, a raw slot `r`) and a
    host file of the test's own outside the store, standing for /etc/shadow or a host disk."""
    root, cfg, names, images = rig
    secret = root / "host-secret.raw"
    secret.write_bytes(b"HOST SECRET\n" * 1024)
    return root, cfg, names, images, str(secret)


def _create(*argv: str) -> None:
    di.run("qemu-img", "create", "-q", "-f", "qcow2", *argv)


def hostile(images, root, secret, kind: str) -> str:
    """Make a hostile image in the store; return the name it offends with."""
    path = str(images / kind)
    if kind == "host-backing":
        _create("-b", secret, "-F", "raw", path)
        return secret
    if kind == "symlink-backing":
        os.symlink(secret, images / "looks-local")
        _create("-b", "looks-local", "-F", "raw", path)
        return "looks-local"
    if kind == "dotdot-backing":
        _create("-b", "../host-secret.raw", "-F", "raw", path)
        return "../host-secret.raw"
    if kind == "data-file":
        data = str(root / "host-data.raw")
        _create("-o", f"data_file={data}", path, "64M")
        return data
    if kind == "json-backing":
        name = 'json:' + json.dumps({"driver": "raw", "file": {"driver": "file", "filename": secret}})
        _create("-u", "-b", name, "-F", "raw", path, "64M")
        return "json:"
    if kind == "protocol-backing":
        _create("-u", "-b", "nbd:127.0.0.1:10809", "-F", "raw", path, "64M")
        return "nbd:127.0.0.1:10809"
    if kind == "deep-host-backing":  # the host file one level further down
        _create("-b", secret, "-F", "raw", str(images / "middle"))
        _create("-b", "middle", "-F", "qcow2", path)
        return secret
    raise AssertionError(kind)


KINDS = ["host-backing", "symlink-backing", "dotdot-backing", "data-file", "json-backing",
         "protocol-backing", "deep-host-backing"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_naming_a_file_outside_the_store_is_refused(vmim, chains, kind):
    root, cfg, names, images, secret = chains
    offending = hostile(images, root, secret, kind)
    slot_sum, raw_sum = sha256(root / "slot.qcow2"), sha256(root / "raw.img")
    for box, flags in ((names["q"], []), (names["r"], ["--disk-image"]),
                       (names["q"], ["-u"])):
        r = vmim("-b", box, "-r", kind, *flags, "--config", cfg)
        assert r.code == 4, r
        assert f"image '{kind}'" in r.err and offending in r.err, r
        assert "refused" in r.err
    assert sha256(root / "slot.qcow2") == slot_sum and sha256(root / "raw.img") == raw_sum
    assert sorted(p for p in os.listdir(root) if ".vmim-tmp" in p) == []
    r = vmim("-b", names["q"], "-r", kind, "--dry-run", "--config", cfg)
    assert r.code == 4 and offending in r.out + r.err, r


def test_a_chain_inside_the_store_still_works(vmim, chains):
    root, cfg, names, images, _ = chains
    _create("-b", "golden", "-F", "qcow2", str(images / "child"))  # relative, inside
    r = vmim("-b", names["q"], "-r", "child", "--config", cfg)
    assert r.code == 0, r
    info = qemu_info(str(root / "slot.qcow2"))
    assert os.path.realpath(info["full-backing-filename"]) == str(images / "child")
    r = vmim("-b", names["r"], "-r", "child", "--disk-image", "--config", cfg)
    assert r.code == 0, r
    with di.attached(str(root / "raw.img"), di.MiB) as dev, di.mounted(dev, "ro") as mp:
        assert open(os.path.join(mp, "marker")).read() == "golden\n"
    # -L and -l read the chain one level at a time and still report the bases
    (entry,) = [e for e in json.loads(vmim("-L", "--json", "--config", cfg).out)["images"]
                if e["name"] == "child"]
    assert entry["base_of"] == [names["q"]]
    r = vmim("-b", names["q"], "-s", "child", "--config", cfg)
    assert r.code == 4 and "is the base of the qcow2 overlay" in r.err, r


def test_a_raw_slot_whose_guest_wrote_a_qcow2_header_is_stored_as_raw(vmim, chains):
    """A raw disk is the guest's to write: a qcow2 header naming a host file at its start
    must not be probed as qcow2 when the disk is stored (--disk-image)."""
    root, cfg, names, images, secret = chains
    evil = str(root / "header.qcow2")
    _create("-b", secret, "-F", "raw", evil, "64M")
    with open(evil, "rb") as src, open(root / "raw.img", "r+b") as dst:
        dst.write(src.read(65536))  # its header cluster: a guest root may write its disk
    r = vmim("-b", names["r"], "-s", "stored", "--disk-image", "--config", cfg)
    assert r.code == 0, r
    out = subprocess.run(["qemu-img", "convert", "-O", "raw", str(images / "stored"),
                          str(root / "back.raw")], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert b"HOST SECRET" not in (root / "back.raw").read_bytes()
