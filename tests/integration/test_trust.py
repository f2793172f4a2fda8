"""Hostile guests and images that 1.0 let through (issue "Trust"): each test failed on 1.0.

Real loop-mounted ext4 slots, the real GNU tar, cpio, find, rsync and compressors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.archives import tar_of
from tests.holes import data_blocks
from tests.integration.test_images import (
    FORMATS,
    _marker,
    as_stored_by_a_release_that_recorded_no_shape,
    run_ok,
)
from vmim.disk import loop, mounts

# ------------------------------------------------------------------ option-like guest names

#: guest directory names that a command reading them as arguments would take as options
OPTION_NAMES = ["-fprint", "-delete", "--delete", "-exec", "--files-from=x", "-xdev", "--",
                "-rf"]


def _hostile_guest(root: str, host_file: str) -> None:
    """1.0's cpio extract of /var/logs ran `find -fprint ...` with cwd at the guest root, and
    the guest's `-xdev -> HOST_FILE` made find truncate the host file."""
    for name in OPTION_NAMES:
        if name == "-xdev":
            continue
        os.makedirs(os.path.join(root, name, "sub"))
        with open(os.path.join(root, name, "sub", "file"), "w") as fh:
            fh.write(f"content of {name}\n")
    os.symlink(host_file, os.path.join(root, "-xdev"))
    os.makedirs(os.path.join(root, "var"))
    os.symlink("/-fprint", os.path.join(root, "var", "logs"))
    with open(os.path.join(root, "keep"), "w") as fh:
        fh.write("guest file\n")


def _guest_names(root: str):
    return sorted(os.listdir(root))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_option_like_guest_names_are_paths_for_every_format(vmim, rig, tmp_path, fmt):
    host_file = tmp_path / "host-file"
    host_file.write_text("host data\n")
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    guest = rig.mnt("ext4")
    _hostile_guest(guest, str(host_file))
    before = _guest_names(guest)
    flag = FORMATS[fmt]
    run_ok(vmim, rig, "-b", rig.names["ext4"], flag, "-e", "logs:/var/logs")
    for name in ("-delete", "--delete", "--files-from=x", "-rf"):
        run_ok(vmim, rig, "-b", rig.names["ext4"], flag, "-e", f"x{name}:/{name}")
    run_ok(vmim, rig, "-b", rig.names["ext4"], flag, "-s", "whole")
    assert host_file.read_text() == "host data\n"  # 1.0 (cpio): guest file names
    assert _guest_names(guest) == before  # 1.0 (cpio, "-delete"): the guest was deleted
    assert open(os.path.join(guest, "keep")).read() == "guest file\n"
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")

    # what was extracted is the guest directory's content, inserted back elsewhere
    run_ok(vmim, rig, "-b", rig.names["xfs"], "-i", "logs:/restored")
    run_ok(vmim, rig, "-b", rig.names["xfs"], "-r", "whole", "-i", "logs:/restored",
           "-i", "x--delete:/restored2")
    xfs = rig.mnt("xfs")
    found = open(os.path.join(xfs, "restored", "var", "logs", "sub", "file")).read() \
        if os.path.isdir(os.path.join(xfs, "restored", "var")) else \
        open(os.path.join(xfs, "restored", "-fprint", "sub", "file")).read()
    assert found == "content of -fprint\n"
    assert open(os.path.join(xfs, "restored2", "--delete", "sub", "file")).read() == \
        "content of --delete\n"
    for name in OPTION_NAMES:  # the whole store kept every one of them
        assert os.path.lexists(os.path.join(xfs, name)), name
    assert os.readlink(os.path.join(xfs, "-xdev")) == str(host_file)
    assert host_file.read_text() == "host data\n"
    run_ok(vmim, rig, "-b", rig.names["xfs"], "--release")


# ------------------------------------------------------------------ images that would not unpack


def _tar_of(tree_files):
    return tar_of((name, "file", data) for name, data in tree_files)


def _cut_tar():
    data = _tar_of([("etc/hostname", b"restored\n"), ("big", os.urandom(200_000)),
                    ("last", b"x" * 5000)])
    end = data.rindex(b"x" * 512) + 512  # the last data block: after it, only zero blocks
    return data[: end - 4096]  # no end marker, the last member cut short


def _cpio_variant(tmp_path, variant):
    src = tmp_path / f"src-{variant}"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("restored\n")
    names = subprocess.run(["find", "."], cwd=src, capture_output=True, check=True).stdout
    data = subprocess.run(["cpio", "-o", "--quiet", f"--format={variant}"], cwd=src, input=names,
                          capture_output=True, check=True).stdout
    return subprocess.run(["bzip2", "-c"], input=data, capture_output=True, check=True).stdout


def _compress(tool, data):
    return subprocess.run([tool, "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("kind", ["tar cut short", "tgz holding a cut tar",
                                  "tar.zst holding a cut tar", "cpio.bz2 odc",
                                  "cpio.bz2 bin"])
def test_images_that_cannot_unpack_are_refused_before_the_slot_is_touched(vmim, rig, tmp_path,
                                                                           kind, domains):
    domains.track(rig.names["ext4"])  # removed at the end if the -u below ever started it
    data = {
        "tar cut short": lambda: _cut_tar(),
        "tgz holding a cut tar": lambda: _compress("gzip", _cut_tar()),
        "tar.zst holding a cut tar": lambda: _compress("zstd", _cut_tar()),
        "cpio.bz2 odc": lambda: _cpio_variant(tmp_path, "odc"),
        "cpio.bz2 bin": lambda: _cpio_variant(tmp_path, "bin"),
    }[kind]()
    (rig.images / "bad").write_bytes(data)
    r = vmim("-b", rig.names["ext4"], "-r", "bad", "-u", "--config", rig.cfg)
    assert r.code == 4, r  # 1.0: the slot cleared, then exit 1 or 6
    assert "cannot be restored" in r.err or "does not read" in r.err, r
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"
    assert not (rig.root / "state").exists() or not os.listdir(rig.root / "state")
    listed = json.loads(vmim("-L", "--json", "--config", rig.cfg).out)["images"]
    fmt = next(e["format"] for e in listed if e["name"] == "bad")
    if "cpio" in kind:
        assert fmt == "unknown"  # 1.0 listed it as cpio.bz2


def test_an_image_bigger_than_the_slot_is_refused_before_the_slot_is_touched(vmim, rig):
    (rig.images / "huge").write_bytes(_compress("zstd", _tar_of([("blob", os.urandom(24 << 20))])))
    r = vmim("-b", rig.names["small"], "-r", "huge", "--config", rig.cfg)
    assert r.code == 4, r
    assert "more than the slot's whole filesystem" in r.err
    assert _marker(vmim, rig, "small") == "small slot\n"


@pytest.mark.parametrize("flag", ["-z", "--zstd"])
def test_a_tar_image_the_tool_stored_too_big_for_the_slot_is_refused_before_the_clear(
        vmim, rig, flag):
    """Proven by its digest (no full read), the image is checked against the bytes of data
    its store counted in GNU tar's own listing: 1.x cleared the slot, then failed (exit 6)."""
    run_ok(vmim, rig, "-b", rig.names["src"], "--mount")
    for name in ("a", "b"):  # two: the listing bounds every file's data but the last one's
        with open(os.path.join(rig.mnt("src"), name), "wb") as fh:
            fh.write(os.urandom(20 << 20))  # each more than the 16 MiB slot holds
    run_ok(vmim, rig, "-b", rig.names["src"], flag, "-s", "big", "--release")
    r = vmim("-b", rig.names["small"], "-r", "big", "--config", rig.cfg)
    assert r.code == 4, r
    assert "checksum" in r.err and "more than the slot's whole filesystem" in r.err, r
    assert _marker(vmim, rig, "small") == "small slot\n"
    assert not (rig.root / "state").exists() or not os.listdir(rig.root / "state")


# ------------------------------------------------------------------ a killed restore


def _cli(cfg, *argv):
    return [sys.executable, "-m", "vmim", "--config", cfg, *argv]


def _wait_for_staging(proc, mnt, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(mnt) and any(n.startswith(".vmim-restore.") for n in os.listdir(mnt)):
            return
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    pytest.fail("the restore never reached unpacking")


def test_a_killed_restore_leaves_a_mark_that_up_refuses_until_a_restore_completes(vmim, rig,
                                                                                  domains):
    # an image that takes a moment to unpack
    files = [(f"d/f{i}", os.urandom(64 << 10)) for i in range(800)]
    (rig.images / "slow").write_bytes(_compress("gzip", _tar_of(files)))
    (rig.images / "good").write_bytes(_compress("gzip", _tar_of([("marker", b"good\n")])))
    box = domains.track(rig.names["ext4"])
    proc = subprocess.Popen(_cli(rig.cfg, "-b", box, "-r", "slow", "-u"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_staging(proc, rig.mnt("ext4"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = vmim("-b", box, "-u", "--config", rig.cfg)
    assert r.code == 4, r  # 1.0: the half-written slot was started (exit 0)
    assert "restore of 'slow'" in r.err and "did not finish" in r.err and "-r NAME" in r.err
    run_ok(vmim, rig, "-b", box, "--release")  # what the killed run left mounted
    assert mounts.mounted_at(rig.mnt("ext4")) is None
    assert loop.loops_backed_by(rig.disk("ext4")) == []
    rows = {b["name"]: b for b in json.loads(vmim("-l", "--json", "--config", rig.cfg).out)["boxes"]}
    assert rows[box]["incomplete"]["image"] == "slow"
    text = vmim("-l", "--config", rig.cfg).out
    assert "restore of slow" in next(line for line in text.splitlines() if box in line)
    # a restore that completes clears the mark
    run_ok(vmim, rig, "-b", box, "-r", "good")
    rows = {b["name"]: b for b in json.loads(vmim("-l", "--json", "--config", rig.cfg).out)["boxes"]}
    assert rows[box]["incomplete"] is None
    assert _marker(vmim, rig, "ext4") == "good\n"


def test_a_restore_that_fails_half_way_marks_the_slot_too(vmim, rig, domains):
    domains.track(rig.names["small"])
    run_ok(vmim, rig, "-b", rig.names["src"], "--mount")
    with open(os.path.join(rig.mnt("src"), "big"), "wb") as fh:
        fh.write(os.urandom(40 << 20))  # more than the 16 MiB slot holds
    run_ok(vmim, rig, "-b", rig.names["src"], "-z", "-s", "big", "--release")
    as_stored_by_a_release_that_recorded_no_shape(rig, "big")
    r = vmim("-b", rig.names["small"], "-r", "big", "--config", rig.cfg)
    assert r.code == 6, r
    r = vmim("-b", rig.names["small"], "-u", "--config", rig.cfg)
    assert r.code == 4 and "restore of 'big'" in r.err, r
    # a store of it keeps what is there, and says it is incomplete (silent before)
    r = vmim("-b", rig.names["small"], "-s", "half", "--release", "--config", rig.cfg)
    assert r.code == 0 and "its filesystem is incomplete" in r.err, r


# ------------------------------------------------------------------ cpio and big files


def test_cpio_store_of_a_file_of_4_gib_is_refused_before_writing(vmim, rig):
    run_ok(vmim, rig, "-b", rig.names["xfs"], "--mount")
    with open(os.path.join(rig.mnt("xfs"), "disk.img"), "wb") as fh:
        fh.truncate(4 << 30)  # sparse: 4 GiB that take no room
    r = vmim("-b", rig.names["xfs"], "-w", "-s", "cpioimg", "--config", rig.cfg)
    assert r.code == 4, r  # 1.0: exit 0 and an image without the file
    assert "4 GiB" in r.err and "/disk.img" in r.err and "--zstd" in r.err
    assert not any(n for n in os.listdir(rig.images) if not n.startswith(".vmim"))
    r = vmim("-b", rig.names["xfs"], "-w", "-e", "x:/", "--config", rig.cfg)
    assert r.code == 4, r
    run_ok(vmim, rig, "-b", rig.names["xfs"], "--release")


# ------------------------------------------------------------------ holes, per format


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_what_each_format_keeps_of_holes(vmim, rig, fmt):
    """docs/images.md states it per format; this measures it.
    tar and rsync: holes stay holes and written zeros stay written (rsync -S: zeros that span
    whole blocks become holes). cpio: no hole map: every zero block becomes a hole."""
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    guest = rig.mnt("ext4")
    block = 4096
    with open(os.path.join(guest, "holes"), "wb") as fh:  # data, hole, data, ... (4 KiB steps)
        for i in range(64):
            if i % 4 == 0:
                fh.seek(i * block)
                fh.write(b"D" * block)
        fh.truncate(64 * block)
    with open(os.path.join(guest, "zeros"), "wb") as fh:  # written zeros (a journal, a swap file)
        fh.write(bytes(64 * block))
        fh.flush()
        os.fsync(fh.fileno())
    holes_before = data_blocks(os.path.join(guest, "holes"))
    assert holes_before == set(range(0, 64, 4))
    assert data_blocks(os.path.join(guest, "zeros")) == set(range(64))
    run_ok(vmim, rig, "-b", rig.names["ext4"], FORMATS[fmt], "-s", "holes", "--release")
    run_ok(vmim, rig, "-b", rig.names["xfs"], "-r", "holes", "--mount")
    xfs = rig.mnt("xfs")
    assert data_blocks(os.path.join(xfs, "holes")) == holes_before  # every format keeps holes
    zeros_after = data_blocks(os.path.join(xfs, "zeros"))
    if fmt in ("cpio.bz2", "rsync"):
        assert zeros_after == set()  # zero blocks become holes
    else:
        assert zeros_after == set(range(64))  # tar writes what was written
    run_ok(vmim, rig, "-b", rig.names["xfs"], "--release")


def test_sourceimage_is_written_in_the_guest_even_over_a_symlink_to_a_host_file(vmim, rig,
                                                                               tmp_path):
    """The slot has sourceimage = true: an image whose /sourceimage is a symlink to a host file
    made the restore write the image name into that host file (1.0 too)."""
    host_file = tmp_path / "host-crontab"
    host_file.write_text("host data\n")
    image = tar_of([("sourceimage", "symlink", str(host_file))])
    (rig.images / "evil").write_bytes(_compress("gzip", image))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "evil", "--mount")
    assert host_file.read_text() == "host data\n"
    written = os.path.join(rig.mnt("ext4"), "sourceimage")
    assert not os.path.islink(written) and open(written).read() == "evil\n"
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_a_restore_that_cannot_mark_the_slot_does_not_touch_it(vmim, rig):
    """The mark must be on disk before the first change: without it (statedir unwritable) the
    restore stops there, exit 7, the slot as it was."""
    (rig.images / "good").write_bytes(_compress("gzip", _tar_of([("marker", b"good\n")])))
    (rig.root / "state").write_text("a file where the state directory should be\n")
    r = vmim("-b", rig.names["ext4"], "-r", "good", "--config", rig.cfg)
    assert r.code == 7, r
    assert "cannot write the restore mark" in r.err and "nothing in the slot was touched" in r.err
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"
