"""Guest names and odd arguments on a real slot: guest data that looks like ours stays, errors
name guest paths, undecodable arguments are names like any other."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

from tests.integration import test_images
from tests.integration.test_images import run_ok
from vmim import tree

# the slots of the images tier
blank_images, rig = test_images.blank_images, test_images.rig


def _tar(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))


def test_an_insert_keeps_guest_entries_named_like_ours_and_removes_a_killed_runs(vmim, rig):
    _tar(rig.inserts / "certs", {"etc/cert.pem": b"cert\n"})
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    guest = rig.mnt("ext4")
    os.makedirs(os.path.join(guest, ".vmim-cache.d"))
    os.makedirs(os.path.join(guest, ".vmim-restore.12345"))
    with open(os.path.join(guest, ".vmim-keys"), "w") as fh:
        fh.write("guest keys\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = os.path.join(guest, f".vmim-insert.{gone.pid}")
    os.mkdir(stale)
    os.setxattr(stale, tree.OWNER_XATTR, f"{gone.pid}:1".encode())  # a run that has ended
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-i", "certs")
    names = os.listdir(guest)
    assert {".vmim-cache.d", ".vmim-restore.12345", ".vmim-keys"} <= set(names)
    assert open(os.path.join(guest, ".vmim-keys")).read() == "guest keys\n"
    assert not os.path.exists(stale)
    assert open(os.path.join(guest, "etc", "cert.pem")).read() == "cert\n"
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_an_insert_through_a_dangling_guest_symlink_names_the_guest_path(vmim, rig):
    _tar(rig.inserts / "conf", {"opt/app/conf": b"x\n"})
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    os.symlink("/nowhere/app", os.path.join(rig.mnt("ext4"), "opt"))
    r = vmim("-b", rig.names["ext4"], "-i", "conf", "--config", rig.cfg)
    assert r.code == 1, r
    error = "\n".join(line for line in r.err.splitlines() if ": error: " in line)
    assert "/opt" in error and ".vmim-" not in error and rig.mnt("ext4") not in error
    assert "/nowhere" in error  # where the guest's symlink leads
    assert not os.path.lexists(os.path.join(rig.mnt("ext4"), "nowhere"))  # nothing made there


def test_an_undecodable_image_name_is_an_unknown_image(rig):
    argv = [sys.executable.encode(), b"-m", b"vmim", b"--config", os.fsencode(rig.cfg),
            b"-b", os.fsencode(rig.names["ext4"]), b"-r", b"bad\xff"]
    r = subprocess.run(argv, capture_output=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 4, r
    assert b"Traceback" not in r.stderr
    assert b"bad\\xff" in r.stderr and b"not found" in r.stderr


def test_image_names_up_to_255_bytes_store_and_longer_ones_are_usage_errors(vmim, rig):
    name = "n" * 250
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-z", "-s", name)
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-s", name)  # again, as a tree over the archive
    assert os.path.isdir(rig.images / name)
    assert sorted(os.listdir(rig.images)) == [".vmim", name]
    r = vmim("-b", rig.names["ext4"], "-s", "n" * 256, "--config", rig.cfg)
    assert r.code == 2 and "too long" in r.err, r
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
