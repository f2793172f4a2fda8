"""Guest names and odd arguments on a real slot: guest data that looks like ours stays, errors
name guest paths, undecodable arguments are names like any other."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from urllib.parse import quote

import pytest

from tests.integration import test_images
from tests.integration.test_images import run_ok
from vmim import procscan

# the slots of the images tier
blank_images, rig = test_images.blank_images, test_images.rig


def _tar(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))


def _slow_tgz(path):
    """An archive that takes a moment to unpack."""
    with tarfile.open(path, "w:gz") as t:
        for i in range(800):
            data = os.urandom(64 << 10)
            info = tarfile.TarInfo(f"d/f{i}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _kill_when_staging(cfg, argv, mnt, prefix, record=None):
    """Run the command and SIGKILL it once its staging directory is in the guest (and, given
    the record's directory, once its record is complete); its name."""
    proc = subprocess.Popen([sys.executable, "-m", "vmim", "--config", cfg, *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mine = f"{prefix}{proc.pid}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(mnt) and mine in os.listdir(mnt) and (
                record is None or '"ino"' in _read(record / f"{mine}.json")):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return mine
        time.sleep(0.01)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"{argv} never made its staging directory: {err}")


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""


def _guest_marks_its_own(guest):
    """Guest entries named like ours, some carrying the staging mark of 1.x (a user.* xattr,
    which the guest's root can set) naming a run that has ended."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    os.makedirs(os.path.join(guest, ".vmim-cache.d"))
    with open(os.path.join(guest, ".vmim-keys"), "w") as fh:
        fh.write("guest keys\n")
    for name in (".vmim-cache", ".vmim-restore.1234", f".vmim-insert.{gone.pid}"):
        os.makedirs(os.path.join(guest, name, "data"))
        with open(os.path.join(guest, name, "data", "file"), "w") as fh:
            fh.write(f"guest data of {name}\n")
        os.setxattr(os.path.join(guest, name), "user.vmim.owner", f"{gone.pid}:1".encode())
    return sorted(n for n in os.listdir(guest) if n.startswith(".vmim-"))


def _records(rig, box):
    d = rig.root / "state" / "staging" / quote(box, safe="")
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_guest_entries_carrying_the_old_owner_mark_are_guest_data(vmim, rig):
    """Finding 9: the leftover mark was a user.* xattr, which the guest sets at will: a guest
    /.vmim-cache with it naming an ended run was deleted by the next --mount."""
    _tar(rig.inserts / "certs", {"etc/cert.pem": b"cert\n"})
    box = rig.names["ext4"]
    run_ok(vmim, rig, "-b", box, "--mount")
    guest = rig.mnt("ext4")
    ours = _guest_marks_its_own(guest)
    run_ok(vmim, rig, "-b", box, "--release")
    run_ok(vmim, rig, "-b", box, "--mount")  # what removes a killed run's leftovers
    run_ok(vmim, rig, "-b", box, "-i", "certs")
    assert sorted(n for n in os.listdir(guest) if n.startswith(".vmim-")) == ours
    for name in (".vmim-cache", ".vmim-restore.1234"):
        with open(os.path.join(guest, name, "data", "file")) as fh:
            assert fh.read() == f"guest data of {name}\n"
    assert open(os.path.join(guest, ".vmim-keys")).read() == "guest keys\n"
    assert open(os.path.join(guest, "etc", "cert.pem")).read() == "cert\n"
    assert _records(rig, box) == []  # the insert's staging came and went with its record
    run_ok(vmim, rig, "-b", box, "--release")


@pytest.mark.parametrize("how", ["insert", "restore"])
def test_a_killed_runs_staging_goes_and_guest_entries_named_like_it_stay(vmim, rig, how):
    box = rig.names["ext4"]
    _slow_tgz(rig.inserts / "slow")
    _slow_tgz(rig.images / "slow")
    run_ok(vmim, rig, "-b", box, "--mount")
    guest = rig.mnt("ext4")
    ours = _guest_marks_its_own(guest)
    argv = ["-b", box, "-i", "slow"] if how == "insert" else ["-b", box, "-r", "slow"]
    if how == "restore":  # the restore clears the guest first: its entries come after
        ours = []
    killed = _kill_when_staging(rig.cfg, argv, guest, f".vmim-{how}.")
    if how == "restore":
        ours = [n for n in _guest_marks_its_own(guest) if n != killed]
    assert os.path.isdir(os.path.join(guest, killed))
    assert killed + ".json" in _records(rig, box)  # recorded on the host, before use
    run_ok(vmim, rig, "-b", box, "--release")  # what the killed run left mounted
    run_ok(vmim, rig, "-b", box, "--mount")
    names = sorted(n for n in os.listdir(guest) if n.startswith(".vmim-"))
    assert names == ours  # the killed run's staging is gone, the guest's look-alikes stay
    assert _records(rig, box) == []
    run_ok(vmim, rig, "-b", box, "--release")


def test_a_corrupt_image_leaves_a_killed_runs_staging_for_the_next_run(vmim, rig):
    """The mount step removes what a killed run left in the guest (its recorded staging) only
    once the image to restore is proven: a corrupt one, its digest checked beside the mount,
    leaves the guest as it was, that staging and its record too; the next run removes them."""
    import json

    box = rig.names["ext4"]
    _slow_tgz(rig.inserts / "slow")
    run_ok(vmim, rig, "-b", box, "-z", "-s", "golden")  # stored by this tool: a digest on record
    test_images._corrupt(rig.images / "golden")
    guest = rig.mnt("ext4")
    record = rig.root / "state" / "staging" / quote(box, safe="")
    killed = _kill_when_staging(rig.cfg, ["-b", box, "-i", "slow"], guest, ".vmim-insert.",
                                record)
    run_ok(vmim, rig, "-b", box, "--release")  # what the killed run left mounted
    assert _records(rig, box) == [killed + ".json"]
    r = vmim("--config", rig.cfg, "-b", box, "-r", "golden", "--json")
    assert r.code == 4 and "corrupt" in r.err, r
    assert _records(rig, box) == [killed + ".json"]  # the staging was not removed
    steps = json.loads(r.out)["results"][0]["steps"]
    assert [(s["step"], s["status"]) for s in steps][:2] == [("verify", "ok"), ("mount", "failed")]
    run_ok(vmim, rig, "-b", box, "--mount")
    assert killed not in os.listdir(guest) and _records(rig, box) == []
    run_ok(vmim, rig, "-b", box, "--release")


def test_a_run_killed_at_any_moment_of_its_start_leaves_nothing_running(vmim, rig):
    """SIGKILL at moments around the start of the insert's sandboxes (the window between a
    fork and setpriv's prctl, where a sandbox used to outlive the run and pin the slot in its
    namespace: the release then refused, exit 8): every command dies with the run, and the
    release lets go of the slot each time."""
    box = rig.names["ext4"]
    _slow_tgz(rig.inserts / "slow")
    guest = rig.mnt("ext4")
    for delay in (0, 0.001, 0.002, 0.003, 0.005, 0.008, 0.01, 0.015, 0.02, 0.03) * 2:
        run_ok(vmim, rig, "-b", box, "--mount")
        proc = subprocess.Popen([sys.executable, "-m", "vmim", "--config", rig.cfg,
                                 "-b", box, "-i", "slow"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mine = f".vmim-insert.{proc.pid}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and mine not in os.listdir(guest):
            assert time.monotonic() < deadline, "the insert never made its staging directory"
            time.sleep(0.001)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        run_ok(vmim, rig, "-b", box, "--release")
        deadline = time.monotonic() + 2  # a SIGKILL sent may not be handled yet
        while _tagged(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _tagged(proc.pid) == [], f"killed {delay} s after its staging began"


def _tagged(run_pid):
    """The processes that carry the owner tag of the run with this pid."""
    return [(pid, procscan.comm(pid)) for pid in os.listdir("/proc") if pid.isdigit() and
            (procscan.owner_of(pid) or "").startswith(f"{run_pid}:")]


def test_a_record_does_not_delete_a_guest_entry_made_later_under_the_same_name(vmim, rig):
    """The killed run's staging removed by hand, the guest makes a directory of that name:
    the record names another inode, so the directory stays and the record goes."""
    box = rig.names["ext4"]
    _slow_tgz(rig.inserts / "slow")
    run_ok(vmim, rig, "-b", box, "--mount")
    guest = rig.mnt("ext4")
    records = rig.root / "state" / "staging" / quote(box, safe="")
    killed = _kill_when_staging(rig.cfg, ["-b", box, "-i", "slow"], guest, ".vmim-insert.",
                                records)
    procscan.reap_orphans([guest])  # its tar, still writing
    subprocess.run(["rm", "-rf", "--", os.path.join(guest, killed)], check=True)
    os.makedirs(os.path.join(guest, killed, "data"))
    run_ok(vmim, rig, "-b", box, "--release")
    run_ok(vmim, rig, "-b", box, "--mount")
    assert os.path.isdir(os.path.join(guest, killed, "data"))
    assert _records(rig, box) == []
    run_ok(vmim, rig, "-b", box, "--release")


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
