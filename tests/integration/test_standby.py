"""Staging into a slot's standby disk while its domain runs, and the swap (vmim.standby, issue
24), against real libvirt, real QEMU and real loop devices.

Domains here need no OS: QEMU opens (and locks) its disks when it starts, which is what the
running guest's disk being "in use" means; tests/e2e/test_standby_boot.py boots a real guest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from tests.integration import diskimages as di
from tests.rig import storage_daemons
from vmim.disk import hold, loop, mounts


@dataclass
class Slot:
    root: str
    cfg: str
    name: str
    disk: str
    standby: str
    images: str
    mnt: str


def debugfs_cat(disk: str, path: str) -> str:
    """A file of an ext4 image, read without mounting it (the domain may hold the disk)."""
    r = subprocess.run(["debugfs", "-R", f"cat {path}", disk], capture_output=True, text=True)
    return r.stdout


def golden(images: str, name: str, marker: str) -> None:
    tree = os.path.join(images, f".tree-{name}")
    os.makedirs(tree, exist_ok=True)
    with open(os.path.join(tree, "marker"), "w") as fh:
        fh.write(marker + "\n")
    tmp = os.path.join(images, f".{name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(tree, arcname=".")
    os.replace(tmp, os.path.join(images, name))  # as a store does: a new file in place


def source_of(domains, name: str) -> str:
    from vmim.definition import disk_source

    return disk_source(domains.conn.lookupByName(name).XMLDesc(0)) or ""


@pytest.fixture
def slot(tmp_path, write_config, domains):
    """A `partition` slot on a 24 MiB ext4 file (/marker 'active') with a standby ext4 file
    (/marker 'spare'); its domain defined on the first and running; `golden` (/marker
    'golden') in the image store."""
    os.chmod(tmp_path, 0o755)
    root = str(tmp_path)
    disk, spare = f"{root}/slot.img", f"{root}/standby.img"
    di.filesystem_image(disk, "ext4", 24, "active")
    di.filesystem_image(spare, "ext4", 24, "spare")
    images = f"{root}/images"
    os.makedirs(images)
    golden(images, "golden", "golden")
    name = domains.define(domains.name("stby"), disk=disk, start=True)
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    mount = "{root}/mnt"
    lockdir = "{root}/locks"
    statedir = "{root}/state"
    [vmim.vm.s]
    HostName = "{name}"
    root = "{disk}"
    standby = "{spare}"
    timeout = 1
    """)
    s = Slot(root, cfg, name, disk, spare, images, f"{root}/mnt/{name}")
    yield s
    dom = domains.conn.lookupByName(name)
    if dom.isActive():
        dom.destroy()
    subprocess.run([sys.executable, "-m", "vmim", "--config", cfg, "-b", name, "--release"],
                   capture_output=True)
    for d in (disk, spare):
        assert loop.loops_backed_by(d) == [] and hold.holders(d) == []
    assert mounts.mounted_at(s.mnt + ".standby") is None


def boxes(vmim, slot):
    r = vmim("-l", "--json", "--config", slot.cfg)
    assert r.code == 0, r
    return {b["name"]: b for b in json.loads(r.out)["boxes"]}


def test_stage_while_the_domain_runs_then_up_swaps(vmim, slot, domains):
    r = vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg)
    assert r.code == 0, r
    assert domains.state(slot.name) == 1  # running all along
    assert debugfs_cat(slot.disk, "/marker") == "active\n"  # the running disk: untouched
    assert debugfs_cat(slot.standby, "/marker") == "golden\n"
    row = boxes(vmim, slot)[slot.name]
    assert row["disk"] == slot.disk and row["standby"] == slot.standby
    assert row["staged"]["image"] == "golden" and row["staged"]["state"] == "ready"
    text = vmim("-l", "--config", slot.cfg).out.splitlines()
    assert text[0].split()[-1] == "STAGED"
    # -l lists the other domains libvirt knows too (other tests', a real host's): this slot's row
    mine = [line.split() for line in text[1:] if line.split()[:1] == [slot.name]]
    assert len(mine) == 1 and mine[0][-2:] == ["golden", row["staged"]["finished"][:16]], text

    r = vmim("-b", slot.name, "-u", "--json", "--config", slot.cfg)
    assert r.code == 0, r
    steps = [s["step"] for s in json.loads(r.out)["results"][0]["steps"]]
    assert steps == ["down", "swap", "release", "up"], steps
    assert domains.state(slot.name) == 1
    assert source_of(domains, slot.name) == slot.standby
    row = boxes(vmim, slot)[slot.name]
    assert row["disk"] == slot.standby and row["standby"] == slot.disk
    assert row["staged"] is None

    # the next staging goes into the disk the domain left, the old active one
    golden(slot.images, "next", "next")
    r = vmim("-b", slot.name, "-r", "next", "--stage", "-u", "--config", slot.cfg)
    assert r.code == 0, r
    assert source_of(domains, slot.name) == slot.disk
    assert debugfs_cat(slot.disk, "/marker") == "next\n"
    assert debugfs_cat(slot.standby, "/marker") == "golden\n"


def test_the_dry_run_shows_the_staging_and_the_swap(vmim, slot, domains):
    r = vmim("-b", slot.name, "-r", "golden", "--stage", "-u", "--dry-run", "--config", slot.cfg)
    assert r.code == 0, r
    lines = [line.strip() for line in r.out.splitlines()]
    names = [line.split(":")[0].split(". ", 1)[1] for line in lines if line[:1].isdigit()]
    assert names == ["verify (standby) (implicit)", "mount (standby) (implicit)",
                     "restore (standby)", "release (standby)", "down (implicit)", "swap",
                     "release (implicit)", "up"], r.out
    assert debugfs_cat(slot.standby, "/marker") == "spare\n"  # a dry run changes nothing


def test_inserts_into_what_is_staged_and_not_without_it(vmim, slot, domains, tmp_path):
    inserts = tmp_path / "inserts"
    inserts.mkdir()
    with tarfile.open(inserts / "extra", "w:gz") as tar:
        info = tarfile.TarInfo("extra")
        info.size = 3
        import io
        tar.addfile(info, io.BytesIO(b"yes"))
    cfg = slot.cfg
    with open(cfg, "a") as fh:
        fh.write(f'vminserts = "{inserts}"\n')
    r = vmim("-b", slot.name, "-i", "extra", "--stage", "--config", cfg)
    assert r.code == 4 and "nothing staged to insert into" in r.err, r
    assert debugfs_cat(slot.standby, "/extra") == ""
    assert vmim("-b", slot.name, "-r", "golden", "--stage", "--config", cfg).code == 0
    r = vmim("-b", slot.name, "-i", "extra", "--stage", "--config", cfg)
    assert r.code == 0, r
    assert debugfs_cat(slot.standby, "/extra") == "yes"
    assert boxes(vmim, slot)[slot.name]["staged"]["state"] == "ready"


def test_an_unfinished_staging_is_never_swapped_in(vmim, slot, domains):
    """A staging that fails half-way (the standby is full) leaves its record unfinished: -u
    boots the current disk and says why, --swap refuses (exit 4). One refused before it
    changed the standby (an image that cannot fit) leaves what was staged before as it was."""
    assert vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg).code == 0
    big = os.path.join(slot.images, ".tree-big")
    os.makedirs(big)
    with open(os.path.join(big, "blob"), "wb") as fh:
        fh.write(os.urandom(40 << 20))  # more than the 24 MiB standby holds
    with tarfile.open(os.path.join(slot.images, "big"), "w") as tar:
        tar.add(big, arcname=".")
    r = vmim("-b", slot.name, "-r", "big", "--stage", "--config", slot.cfg)
    assert r.code == 4 and "not touched" in r.err, r
    assert boxes(vmim, slot)[slot.name]["staged"]["state"] == "ready"
    assert debugfs_cat(slot.standby, "/marker") == "golden\n"
    # a whole standby's worth of files each holding data: the image's data fits, the
    # filesystem's own blocks for them do not (the room check counts data, not metadata)
    many = os.path.join(slot.images, ".tree-many")
    os.makedirs(many)
    for i in range(3000):
        with open(os.path.join(many, f"f{i}"), "wb") as fh:
            fh.write(b"x" * 7000)
    with tarfile.open(os.path.join(slot.images, "many"), "w") as tar:
        tar.add(many, arcname=".")
    r = vmim("-b", slot.name, "-r", "many", "--stage", "--config", slot.cfg)
    assert r.code != 0, r
    assert domains.state(slot.name) == 1
    assert boxes(vmim, slot)[slot.name]["staged"]["state"] == "unfinished"
    r = vmim("-b", slot.name, "--swap", "--config", slot.cfg)
    assert r.code == 4 and "did not finish" in r.err, r
    assert domains.state(slot.name) == 1  # refused before anything was done
    r = vmim("-b", slot.name, "-k", "-u", "--json", "--config", slot.cfg)
    assert r.code == 0, r
    up = json.loads(r.out)["results"][0]["steps"][-1]
    assert up["step"] == "up" and "not swapped in" in up["message"], up
    assert "did not finish" in up["message"] and "did not finish" in r.err, r
    assert source_of(domains, slot.name) == slot.disk


def test_a_staged_image_stored_again_since_is_not_swapped_in(vmim, slot, domains):
    assert vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg).code == 0
    golden(slot.images, "golden", "golden-2")  # stored again: another file
    r = vmim("-b", slot.name, "--dry-run", "-u", "--config", slot.cfg)
    assert "stored again" in r.out and "swap" not in r.out.replace("swapped", ""), r
    r = vmim("-b", slot.name, "--swap", "--config", slot.cfg)
    assert r.code == 4 and "stored again" in r.err, r
    assert source_of(domains, slot.name) == slot.disk
    assert boxes(vmim, slot)[slot.name]["staged"]["state"] == "stale"


def test_a_standby_another_domain_lists_is_refused(vmim, slot, domains):
    other = domains.define(domains.name("other"), disk=slot.standby)  # defined, shut off
    r = vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg)
    assert r.code == 4 and other in r.err, r
    assert debugfs_cat(slot.standby, "/marker") == "spare\n"


def test_two_stagings_of_one_slot_serialize(vmim, slot, domains):
    from vmim import lock

    with lock.slot_lock(f"{slot.root}/locks", slot.name + "/standby"):
        r = vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg)
        assert r.code == 5 and "locked" in r.err, r
        # the slot's own lock is not the standby's: the active disk's commands go on
        assert vmim("-b", slot.name, "-l", "--config", slot.cfg).code == 0
    assert debugfs_cat(slot.standby, "/marker") == "spare\n"


KILLER = textwrap.dedent("""\
    import os, signal, sys
    from vmim import cli, standby
    from vmim.domain import Hypervisor
    where = sys.argv[1]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    def refused(self, xml):  # libvirtd restarting: the call fails
        raise self.libvirt.libvirtError("Cannot recv data: Connection reset by peer")
    if where == "before-define":
        Hypervisor.define = die
    elif where == "define-fails":
        Hypervisor.define = refused
    else:
        standby.swapped = die
    sys.exit(cli.main(sys.argv[2:]))
    """)


@pytest.mark.parametrize("where", ["before-define", "define-fails", "after-define"])
def test_a_swap_killed_at_any_instant_leaves_a_complete_disk_defined(vmim, slot, domains, where):
    """kill -9 just before libvirt's definition changes and just after (before the record
    follows); libvirtd failing the define. The guest here ignores ACPI: forced off after the
    timeout, as a domain that will not shut down is."""
    assert vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg).code == 0
    p = subprocess.run([sys.executable, "-c", KILLER, where, "-b", slot.name, "-u",
                        "--config", slot.cfg], capture_output=True, text=True)
    if where == "define-fails":
        assert p.returncode == 1 and "swap failed" in p.stderr, p
        assert domains.state(slot.name) == 5  # left down, as after any failed step
    else:
        assert p.returncode == -signal.SIGKILL, p
    defined = source_of(domains, slot.name)
    assert defined == (slot.standby if where == "after-define" else slot.disk)
    assert debugfs_cat(defined, "/marker") in ("active\n", "golden\n")  # complete either way
    # the next -u ends the work: the staged image runs, swapped exactly once
    r = vmim("-b", slot.name, "-u", "--json", "--config", slot.cfg)
    assert r.code == 0, r
    assert domains.state(slot.name) == 1
    assert source_of(domains, slot.name) == slot.standby
    row = boxes(vmim, slot)[slot.name]
    assert row["disk"] == slot.standby and row["staged"] is None, row


@pytest.mark.parametrize("release", [False, True])
def test_a_killed_staging_is_not_swapped_in(vmim, slot, domains, release):
    """kill -9 in the middle of the unpack into the standby."""
    big = os.path.join(slot.images, ".tree-slow")
    os.makedirs(big)
    for i in range(200):
        with open(os.path.join(big, f"f{i}"), "wb") as fh:
            fh.write(os.urandom(50_000))
    with tarfile.open(os.path.join(slot.images, "slow"), "w:gz") as tar:
        tar.add(big, arcname=".")
    p = subprocess.Popen([sys.executable, "-m", "vmim", "-b", slot.name, "-r", "slow",
                          "--stage", "--config", slot.cfg], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    record = os.path.join(slot.root, "state", quote(slot.name, safe="") + ".standby.json")

    def began():  # the record says so before the staging's first change of the standby
        try:
            with open(record) as fh:
                staged = json.load(fh).get("staged") or {}
        except (OSError, ValueError):
            return False
        return staged.get("image") == "slow" and staged.get("finished") is None

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not began():
            time.sleep(0.005)
        assert began()
        assert mounts.mounted_at(slot.mnt + ".standby") is not None
    finally:
        p.kill()
        p.wait()
    staged = boxes(vmim, slot)[slot.name]["staged"]
    assert staged["state"] == "unfinished", staged
    r = vmim("-b", slot.name, "-u", "--config", slot.cfg)
    assert r.code == 0, r
    assert source_of(domains, slot.name) == slot.disk
    if release:  # --release of the slot releases what the killed staging left of its standby
        assert mounts.mounted_at(slot.mnt + ".standby") is not None
        r = vmim("-b", slot.name, "--release", "--config", slot.cfg)
        assert r.code == 0 and mounts.mounted_at(slot.mnt + ".standby") is None, r
        assert loop.loops_backed_by(slot.standby) == []
    # the next staging cleans up what the killed one left, and completes
    r = vmim("-b", slot.name, "-r", "golden", "--stage", "--config", slot.cfg)
    assert r.code == 0, r
    assert mounts.mounted_at(slot.mnt + ".standby") is None
    assert debugfs_cat(slot.standby, "/marker") == "golden\n"


def test_a_qcow2_slot_stages_a_new_overlay_beside_the_running_one(vmim, tmp_path, write_config,
                                                                   domains):
    """No standby key: a qcow2 slot's standby is NAME.standby.qcow2. The staging makes a new
    overlay there on the image (constant time) while the domain runs on the old one; the swap
    points the domain at it and removes the old overlay when it was one on an image (a qcow2
    disk of its own stays as the standby)."""
    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    di.qcow2_golden(str(images / "golden"), "golden", raw=str(tmp_path / "raw.img"))
    disk, spare = str(tmp_path / "slot.qcow2"), str(tmp_path / "slot.standby.qcow2")
    di.run("qemu-img", "create", "-q", "-f", "qcow2", disk, "20G")
    name = domains.define(domains.name("q"), disk=disk, fmt="qcow2", start=True)
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    [vmim.vm.q]
    HostName = "{name}"
    HostDisk = "{disk}"
    timeout = 1
    """)
    try:
        r = vmim("-b", name, "-r", "golden", "--stage", "--config", cfg)
        assert r.code == 0, r
        assert domains.state(name) == 1
        info = json.loads(di.run("qemu-img", "info", "--output=json", "-U", spare))
        assert info["backing-filename"] == str(images / "golden")
        assert "backing-filename" not in json.loads(
            di.run("qemu-img", "info", "--output=json", "-U", disk))  # the running one
        r = vmim("-b", name, "-u", "--config", cfg)
        assert r.code == 0, r
        assert domains.state(name) == 1 and source_of(domains, name) == spare
        assert os.path.exists(disk)  # a disk of its own (no backing image): kept
        row = boxes(vmim, type("S", (), {"cfg": cfg})())[name]
        assert row["disk"] == spare and row["standby"] == disk and row["staged"] is None
        # and back: the next staging makes the overlay at the first name again
        r = vmim("-b", name, "-r", "golden", "--stage", "-u", "--config", cfg)
        assert r.code == 0, r
        assert source_of(domains, name) == disk and not os.path.exists(spare)
    finally:
        dom = domains.conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
    assert storage_daemons(str(tmp_path)) == set()
