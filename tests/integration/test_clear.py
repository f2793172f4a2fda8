"""The clear of an archive restore: with the default (`clear = "auto"`) the old content is
deleted beside the unpack when the filesystem has room for both; else the filesystem is re-made
only when it comes back the same, field by field of `dumpe2fs -h` / `xfs_info` and the xfs
superblock, and its content is deleted otherwise; the --json says which ran and why."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from tests.integration import diskimages as di

MiB = 1024 * 1024

#: what may differ after a re-make, named here and not taken from vmim: counts of used and
#: free blocks and inodes, times, mount counts and mount state, and the journal's state that
#: the kernel sets when it mounts (and the checksums over these)
EXT_MAY_DIFFER = {
    "Free blocks", "Free inodes", "Filesystem created", "Last mount time", "Last write time",
    "Last checked", "Next check after", "Mount count", "Lifetime writes", "Last mounted on",
    "Filesystem state", "Checksum", "Journal features", "Journal sequence", "Journal start",
    "Journal checksum type", "Journal checksum",
}
XFS_SB_MAY_DIFFER = {"icount", "ifree", "fdblocks", "frextents", "lsn", "crc"}

#: (type, size MiB, mkfs argv, tune2fs argv or None): filesystems with other than the defaults
ODD = {
    "ext4-small-inodes": ("ext4", 200, ["mkfs.ext4", "-q", "-F", "-I", "128", "-i", "8192",
                                        "-m", "1", "-O", "^metadata_csum", "-L", "odd ext4"],
                          None),
    "ext4-tuned": ("ext4", 200, ["mkfs.ext4", "-q", "-F", "-b", "1024", "-J", "size=8",
                                 "-E", "stride=8,stripe_width=16", "-e", "remount-ro",
                                 "-O", "^huge_file,^dir_nlink,orphan_file"],
                   ["tune2fs", "-o", "journal_data,^acl", "-E", "mount_opts=nodelalloc",
                    "-c", "20", "-i", "2w", "-r", "1000", "-L", "tuned"]),
    "ext3": ("ext3", 64, ["mkfs.ext3", "-q", "-F", "-T", "small", "-L", "old"], None),
    "xfs-odd": ("xfs", 400, ["mkfs.xfs", "-q", "-f", "-m", "reflink=0,finobt=0",
                             "-i", "size=1024", "-d", "agcount=5", "-L", "odd xfs"], None),
}


def _phases(step):
    """A restore's timings past its preparation (prepare: always there; digest wait: where
    the image's digest was checked beside the mount)."""
    assert "prepare" in step["timings"], step
    return set(step["timings"]) - {"prepare", "digest wait"}


def _fields(text):
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith(" "):
            out[key.strip()] = " ".join(value.split())
    return out


def ext_superblock(img):
    return _fields(di.run("dumpe2fs", "-h", img))


def xfs_superblock(img):
    info = di.run("xfs_info", img).replace(img, "IMG")
    sb = {}
    for line in di.run("xfs_db", "-r", "-c", "sb 0", "-c", "print", img).splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            sb[key.strip()] = value.strip()
    # the ATTR bit: set by XFS when an extended attribute is first written (the restore
    # writes some), not by mkfs
    sb["versionnum"] = hex(int(sb["versionnum"], 16) & ~0x10)
    return info, sb


def label_uuid(img):
    return (di.run("blkid", "-p", "-s", "LABEL", "-o", "value", img).strip(),
            di.run("blkid", "-p", "-s", "UUID", "-o", "value", img).strip())


@pytest.fixture
def slot(root_slot):
    """The slot of root_slot, its image store holding 'golden', a tgz of a small tree."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("etc/hostname", b"golden\n"), ("usr/share/doc/a", b"a" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (root_slot.images / "golden").write_bytes(buf.getvalue())
    return root_slot


def restore(vmim, slot, cfg, ballast_mib=0):
    """Fill the slot with stale content (and ballast_mib MiB of allocated blocks), restore
    golden with --json; the restore's result."""
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    if ballast_mib:
        fd = os.open(os.path.join(slot.mnt, "ballast"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, ballast_mib * MiB)
        finally:
            os.close(fd)
    os.makedirs(os.path.join(slot.mnt, "stale"))
    with open(os.path.join(slot.mnt, "stale", "file"), "w") as fh:
        fh.write("old\n")
    r = vmim("--config", cfg, "-b", slot.box, "-r", "golden", "--mount", "--json")
    assert r.code == 0, r
    step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "restore")
    assert not os.path.exists(os.path.join(slot.mnt, "stale"))
    with open(os.path.join(slot.mnt, "etc", "hostname")) as fh:
        assert fh.read() == "golden\n"
    r = vmim("--config", cfg, "-b", slot.box, "--release")
    assert r.code == 0, r
    return step


@pytest.mark.parametrize("kind", sorted(ODD))
def test_default_clear_re_makes_the_same_filesystem(vmim, slot, kind):
    fstype, size, mkfs, tune = ODD[kind]
    slot.make(size, mkfs, tune)
    cfg = slot.config()  # clear not set: the default
    vmim("--config", cfg, "-b", slot.box, "--mount")  # mounted once, as a used slot was
    vmim("--config", cfg, "-b", slot.box, "--release")
    if fstype == "xfs":
        info_before, sb_before = xfs_superblock(slot.img)
    else:
        before = ext_superblock(slot.img)
    names_before = label_uuid(slot.img)

    # with room for the image beside the old content, auto deletes beside the unpack
    # instead: take the room (the filesystem is re-made anyway)
    step = restore(vmim, slot, cfg, ballast_mib=size // 4 if size >= 300 else 0)
    assert step["clear"]["method"] == "mkfs", step
    assert f"the same {fstype} re-made" in step["clear"]["why"]
    assert _phases(step) == {"clear", "transfer"}
    assert label_uuid(slot.img) == names_before
    if fstype == "xfs":
        info_after, sb_after = xfs_superblock(slot.img)
        assert info_after == info_before
        assert {k: v for k, v in sb_after.items() if k not in XFS_SB_MAY_DIFFER} == \
            {k: v for k, v in sb_before.items() if k not in XFS_SB_MAY_DIFFER}
    else:
        after = ext_superblock(slot.img)
        assert "Directory Hash Seed" in after
        differ = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                  if k not in EXT_MAY_DIFFER and before.get(k) != after.get(k)}
        assert differ == {}
        assert after["Filesystem created"] != before["Filesystem created"] or \
            after["Free inodes"] != before["Free inodes"]  # it really was re-made


def test_a_checksum_seed_mkfs_cannot_make_falls_back_to_delete(vmim, slot):
    """An ext4 with metadata_csum_seed whose UUID was changed afterwards (as clones of one
    image get): mke2fs derives the seed from the UUID, so it cannot make this one again."""
    slot.make(64, ["mkfs.ext4", "-q", "-F", "-O", "metadata_csum_seed", "-L", "seeded"],
              ["tune2fs", "-U", "random"])
    cfg = slot.config()
    before = ext_superblock(slot.img)
    step = restore(vmim, slot, cfg)
    assert step["clear"]["method"] == "delete", step
    assert "cannot be re-made the same" in step["clear"]["why"]
    assert "Checksum seed" in step["clear"]["why"]
    assert "unpacked after clearing (delete): the ext4 filesystem cannot" in step["message"]
    after = ext_superblock(slot.img)
    assert after["Filesystem created"] == before["Filesystem created"]  # not re-made
    assert after["Checksum seed"] == before["Checksum seed"]


def test_a_feature_mke2fs_refuses_falls_back_to_delete(vmim, slot):
    """dir_prealloc (set with debugfs: a kernel mounts it, mke2fs does not make it)."""
    slot.make(64, ["mkfs.ext4", "-q", "-F"], ["debugfs", "-w", "-R", "feature dir_prealloc"])
    step = restore(vmim, slot, slot.config())
    assert step["clear"]["method"] == "delete", step
    assert "mke2fs refused" in step["clear"]["why"]
    assert "dir_prealloc" in ext_superblock(slot.img)["Filesystem features"]


def test_default_clear_deletes_beside_the_unpack_a_small_old_content_with_room_for_both(
        vmim, slot):
    """Faster than the re-make where the old content has few files (docs/performance.md),
    and the filesystem stays the one it was; the --json says so."""
    slot.make(400, ["mkfs.ext4", "-q", "-F"])
    before = ext_superblock(slot.img)
    step = restore(vmim, slot, slot.config())
    assert step["clear"]["method"] == "delete", step
    assert step["clear"]["why"].startswith("auto: ") and step["clear"]["why"].endswith(
        " inodes to delete, and room for the image beside them: deleted while the image "
        "unpacks"), step
    assert _phases(step) == {"clear", "transfer", "delete"}, step
    assert ext_superblock(slot.img)["Filesystem created"] == before["Filesystem created"]


def test_default_clear_re_makes_a_filesystem_of_many_files(vmim, slot):
    """The rm of many files slows the unpack down more than a re-make costs."""
    from vmim.steps.data import DELETE_BESIDE_INODES

    slot.make(400, ["mkfs.ext4", "-q", "-F", "-N", str(DELETE_BESIDE_INODES + 8192)])
    cfg = slot.config()
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    many = os.path.join(slot.mnt, "many")
    os.mkdir(many)
    for i in range(DELETE_BESIDE_INODES):
        open(os.path.join(many, str(i)), "w").close()
    step = restore(vmim, slot, cfg)
    assert step["clear"]["method"] == "mkfs", step


def test_an_image_proven_by_its_digest_deletes_beside_only_when_its_size_is_recorded(vmim,
                                                                                      slot):
    """No full read, so no size from the image itself: the store recorded what its filesystem
    used. An image of an older store has no such record: the room for both is not known, and
    the filesystem is re-made (the restore then fits whatever it holds)."""
    slot.make(400, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config()
    step = restore(vmim, slot, cfg)
    r = vmim("--config", cfg, "-b", slot.box, "--zstd", "-s", "mine")
    assert r.code == 0, r
    meta_path = slot.images / ".vmim" / "mine.json"
    assert json.loads(meta_path.read_text())["filesystem_used"] > 0
    r = vmim("--config", cfg, "-b", slot.box, "-r", "mine", "--json")
    assert r.code == 0, r
    step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "restore")
    verify = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "verify")
    assert ": checksum" in verify["message"], verify
    assert step["clear"]["method"] == "delete", step
    meta = json.loads(meta_path.read_text())
    del meta["filesystem_used"]
    meta_path.write_text(json.dumps(meta))
    r = vmim("--config", cfg, "-b", slot.box, "-r", "mine", "--json")
    assert r.code == 0, r
    step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "restore")
    assert step["clear"]["method"] == "mkfs", step


def test_clear_delete_in_the_config_is_kept(vmim, slot):
    slot.make(64, ["mkfs.ext4", "-q", "-F"])
    before = ext_superblock(slot.img)
    step = restore(vmim, slot, slot.config("delete"))
    assert step["clear"]["method"] == "delete"
    assert step["clear"]["why"] == 'clear = "delete" in the config'
    assert ext_superblock(slot.img)["Filesystem created"] == before["Filesystem created"]


def test_delete_runs_beside_the_unpack_when_both_trees_fit(vmim, slot):
    """The old content is set aside and deleted while the image unpacks: the --json times
    the wait for it as "delete" and says how long the deletion ran."""
    slot.make(400, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config("delete")
    vmim("--config", cfg, "-b", slot.box, "--mount")
    for i in range(300):
        with open(os.path.join(slot.mnt, f"old{i}"), "w") as fh:
            fh.write("old\n")
    os.mkdir(os.path.join(slot.mnt, ".old-dotdir"))
    step = restore(vmim, slot, cfg)
    assert _phases(step) == {"clear", "transfer", "delete"}, step
    assert step["clear"]["delete_seconds"] >= 0
    vmim("--config", cfg, "-b", slot.box, "--mount")
    assert sorted(os.listdir(slot.mnt)) == ["etc", "lost+found", "usr"]
    vmim("--config", cfg, "-b", slot.box, "--release")


def test_delete_runs_first_when_the_filesystem_has_no_room_for_both(vmim, slot):
    slot.make(64, ["mkfs.ext4", "-q", "-F", "-m", "0"])
    cfg = slot.config("delete")
    vmim("--config", cfg, "-b", slot.box, "--mount")
    with open(os.path.join(slot.mnt, "big"), "wb") as fh:  # more than half of it
        fh.write(b"x" * 40 * MiB)
    step = restore(vmim, slot, cfg)
    assert _phases(step) == {"clear", "transfer"}, step
    assert "delete_seconds" not in step["clear"]


def test_delete_runs_first_when_the_image_has_more_files_than_room_for_both(vmim, slot):
    """The old content (1200 files) leaves room for as many again, not for the image's 3000:
    deleted beside the unpack, both would need more inodes than the filesystem has (the room
    was judged by the old content's count, as if the image had as many)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 7
        tf.addfile(info, io.BytesIO(b"golden\n"))
        for n in range(3000):
            tf.addfile(tarfile.TarInfo(f"many/{n}"))
    (slot.images / "golden").write_bytes(buf.getvalue())
    slot.make(400, ["mkfs.ext4", "-q", "-F", "-N", "4096"])
    cfg = slot.config("delete")
    vmim("--config", cfg, "-b", slot.box, "--mount")
    os.mkdir(os.path.join(slot.mnt, "old"))
    for n in range(1200):
        open(os.path.join(slot.mnt, "old", str(n)), "w").close()
    step = restore(vmim, slot, cfg)
    assert _phases(step) == {"clear", "transfer"}, step
    assert "delete_seconds" not in step["clear"]


def test_clear_mkfs_re_makes_even_what_it_cannot_make_the_same(vmim, slot):
    slot.make(64, ["mkfs.ext4", "-q", "-F", "-O", "metadata_csum_seed", "-L", "seeded"],
              ["tune2fs", "-U", "random"])
    names = label_uuid(slot.img)
    step = restore(vmim, slot, slot.config("mkfs"))
    assert step["clear"]["method"] == "mkfs"
    assert "its defaults, the same UUID and label" in step["clear"]["why"]
    assert label_uuid(slot.img) == names



def test_an_immutable_entry_the_guest_left_makes_auto_re_make_not_fail(vmim, slot):
    """chattr +i on an entry of the root (the guest's root may set it): it cannot be set aside
    for the delete beside the unpack, so auto re-makes the filesystem instead, and says why."""
    import subprocess

    slot.make(400, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config()
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    pinned = os.path.join(slot.mnt, "pinned")
    with open(pinned, "w") as fh:
        fh.write("old\n")
    subprocess.run(["chattr", "+i", pinned], check=True)
    step = restore(vmim, slot, cfg)
    assert step["clear"]["method"] == "mkfs", step
    assert step["clear"]["why"].startswith(
        "the old content could not be set aside (Operation not permitted: pinned): the same "
        "ext4 re-made"), step
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    assert sorted(os.listdir(slot.mnt)) == ["etc", "lost+found", "usr"]
    vmim("--config", cfg, "-b", slot.box, "--release")


def test_an_immutable_file_inside_the_old_content_fails_the_delete_naming_clear_mkfs(vmim, slot):
    """The set-aside moves the top-level entries only: a file made immutable below them is met
    by the rm beside the unpack. The restore fails (exit 6), the slot marked incomplete, and
    the message says what to set."""
    import subprocess
    import sys

    slot.make(400, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config()
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    os.makedirs(os.path.join(slot.mnt, "var", "lib"))
    pinned = os.path.join(slot.mnt, "var", "lib", "pinned")
    with open(pinned, "w") as fh:
        fh.write("old\n")
    subprocess.run(["chattr", "+i", pinned], check=True)
    try:
        # in a process of its own: what it leaves is a run's that has ended
        done = subprocess.run([sys.executable, "-m", "vmim", "--config", cfg, "-b", slot.box,
                               "-r", "golden", "--mount"], capture_output=True, text=True)
        assert done.returncode == 6, done
        assert "Operation not permitted" in done.stderr and 'clear = "mkfs"' in done.stderr
        assert "incomplete" in done.stderr, done.stderr
        # what is left (the set-aside old content) pins nothing: the slot mounts, and the
        # next restore re-makes the filesystem (on the main of 2026-12-07 every later mount
        # and restore failed on it, clear = "mkfs" too)
        vmim("--config", cfg, "-b", slot.box, "--release")
        r = vmim("--config", cfg, "-b", slot.box, "--mount")
        assert r.code == 0 and "could not be removed" in r.err, r
        r = vmim("--config", cfg, "-b", slot.box, "-r", "golden", "--mount", "--json")
        assert r.code == 0, r
        step = next(s for s in json.loads(r.out)["results"][0]["steps"]
                    if s["step"] == "restore")
        assert step["clear"]["method"] == "mkfs", step
        assert sorted(os.listdir(slot.mnt)) == ["etc", "lost+found", "usr"]
    finally:
        r = vmim("--config", cfg, "-b", slot.box, "--mount")
        for top, _dirs, files in os.walk(slot.mnt):
            if "pinned" in files:
                subprocess.run(["chattr", "-i", os.path.join(top, "pinned")], check=True)
        vmim("--config", cfg, "-b", slot.box, "--release")


# ------------------------------------------------------------------ a kill inside the re-make

#: a stand-in for the mkfs program of the re-make: on the slot's device (a block device; the
#: trial runs on a file) it does what mkfs does first, wiping the old signatures, says so,
#: and waits to be killed with the run (as every command of a run dies with it)
STALLED_MKFS = """#!/bin/sh
for a in "$@"; do
    if [ -b "$a" ]; then
        wipefs --all --quiet "$a" && touch {flag}
        exec sleep 600
    fi
done
exec {real} "$@"
"""


def kill_in_the_re_make(slot, cfg, tmp_path, program, shim, image):
    """Restore image with `program` replaced by shim (which touches {flag} where it stalls),
    and kill -9 the restore there."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    bindir, flag = tmp_path / "bin", tmp_path / "mkfs-began"
    bindir.mkdir()
    (bindir / program).write_text(shim.format(flag=flag, real=shutil.which(program)))
    (bindir / program).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "vmim", "--config", cfg, "-b", slot.box,
                             "-r", image], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not flag.exists():
        proc.kill()
        pytest.fail(f"the re-make never began: {proc.communicate()[1].decode()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_restore_killed_inside_the_re_make_is_re_made_by_the_next_restore(
        vmim, slot, tmp_path, fstype):
    """Killed while mkfs runs, a restore leaves no filesystem (1.x and the 2026-12-07 main:
    the next restore refused the slot, "no filesystem found", exit 4, for good). The re-make
    was recorded before the unmount: the next restore runs it again — the same type, UUID and
    label — and restores; a run that does not restore is refused, the disk untouched."""
    import subprocess

    program = "mke2fs" if fstype == "ext4" else "mkfs.xfs"
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "killed"] if fstype == "ext4" else \
        ["mkfs.xfs", "-q", "-f", "-L", "killed"]
    slot.make(320, mkfs)
    cfg = slot.config(clear="mkfs")
    names_before = label_uuid(slot.img)
    kill_in_the_re_make(slot, cfg, tmp_path, program, STALLED_MKFS, "golden")
    # the kill landed inside the re-make: the disk holds no filesystem now, and the re-make
    # is on record
    assert subprocess.run(["blkid", "-p", slot.img], capture_output=True).returncode == 2
    assert [n for n in os.listdir(tmp_path / "state") if n.endswith(".remake")] != []

    for argv, says in ((["--mount"], "interrupted while it re-made the slot's filesystem"),
                       (["-s", "copy"], "interrupted while it re-made"),
                       (["-u"], "restore of 'golden'")):
        r = vmim("--config", cfg, "-b", slot.box, *argv)
        assert r.code == 4 and says in r.err and "-r NAME" in r.err, (argv, r)
    assert sorted(os.listdir(slot.images)) == ["golden"]
    assert subprocess.run(["blkid", "-p", slot.img], capture_output=True).returncode == 2
    if fstype == "ext4":  # grown since: not the device the re-make was for
        size = os.path.getsize(slot.img)
        os.truncate(slot.img, size + 64 * MiB)
        r = vmim("--config", cfg, "-b", slot.box, "-r", "golden")
        assert r.code == 4 and f"on a device of {size} bytes" in r.err, r
        assert subprocess.run(["blkid", "-p", slot.img], capture_output=True).returncode == 2
        os.truncate(slot.img, size)

    r = vmim("--config", cfg, "-b", slot.box, "-r", "golden", "--json")
    assert r.code == 0, r
    assert "making it again" in r.err, r
    assert label_uuid(slot.img) == names_before
    assert di.run("blkid", "-p", "-s", "TYPE", "-o", "value", slot.img).strip() == fstype
    rows = {b["name"]: b for b in json.loads(vmim("--config", cfg, "-l", "--json").out)["boxes"]}
    assert rows[slot.box]["incomplete"] is None
    assert [n for n in os.listdir(tmp_path / "state")
            if n.endswith((".remake", ".incomplete"))] == []
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    with open(os.path.join(slot.mnt, "etc", "hostname")) as fh:
        assert fh.read() == "golden\n"
    vmim("--config", cfg, "-b", slot.box, "--release")


STALLED_BEFORE_MKFS = """#!/bin/sh
for a in "$@"; do
    if [ -b "$a" ]; then
        touch {flag}
        exec sleep 600
    fi
done
exec {real} "$@"
"""


def test_a_corrupt_image_never_runs_the_re_make_a_killed_restore_left(vmim, slot, tmp_path):
    """Killed after it recorded its re-make and unmounted, before mkfs began, a restore leaves
    the old filesystem whole and the record: the next restore re-makes first. With an image
    whose digest is checked beside the mount, that re-make waits for the check: a corrupt
    image leaves the old filesystem as it was (exit 4), the record kept for the next
    restore."""
    import subprocess

    slot.make(320, ["mkfs.ext4", "-q", "-F", "-L", "old"])
    cfg = slot.config(clear="mkfs")
    assert vmim("--config", cfg, "-b", slot.box, "--mount").code == 0
    with open(os.path.join(slot.mnt, "marker"), "w") as fh:
        fh.write("old slot\n")
    r = vmim("--config", cfg, "-b", slot.box, "--zstd", "-s", "mine", "--release")
    assert r.code == 0, r
    kill_in_the_re_make(slot, cfg, tmp_path, "mke2fs", STALLED_BEFORE_MKFS, "mine")
    records = [n for n in os.listdir(tmp_path / "state") if n.endswith(".remake")]
    assert records != []

    def old_marker():
        return subprocess.run(["debugfs", "-R", "cat /marker", slot.img], capture_output=True,
                              text=True).stdout

    assert old_marker() == "old slot\n"
    image = slot.images / "mine"
    good, st = image.read_bytes(), os.stat(image)
    bad = bytearray(good)
    bad[-16] ^= 0xFF
    image.write_bytes(bytes(bad))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = vmim("--config", cfg, "-b", slot.box, "-r", "mine", "--json")
    assert r.code == 4 and "digest differs" in r.err, r
    assert "making it again" not in r.err
    assert old_marker() == "old slot\n"
    assert [n for n in os.listdir(tmp_path / "state") if n.endswith(".remake")] == records

    image.write_bytes(good)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = vmim("--config", cfg, "-b", slot.box, "-r", "mine")
    assert r.code == 0 and "making it again" in r.err, r
    assert vmim("--config", cfg, "-b", slot.box, "--mount").code == 0
    with open(os.path.join(slot.mnt, "marker")) as fh:
        assert fh.read() == "old slot\n"  # the image's
    assert vmim("--config", cfg, "-b", slot.box, "--release").code == 0


@pytest.mark.parametrize("clear", ["delete", "auto"])
def test_what_the_previous_guest_left_in_lost_found_goes_with_it(vmim, slot, clear):
    """The clear kept the filesystem's lost+found whole: a stash of the previous guest (a
    setuid program, say) survived every restore with clear = "delete" (an attack of
    2026-12-07). The directory stays; its content goes, as a re-make leaves it."""
    slot.make(400, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config(clear=clear)
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    stash = os.path.join(slot.mnt, "lost+found", "stash")
    os.makedirs(stash)
    with open(os.path.join(stash, "persist"), "w") as fh:
        fh.write("still here\n")
    with open(os.path.join(slot.mnt, "lost+found", "#12"), "w") as fh:
        fh.write("fsck's\n")
    r = vmim("--config", cfg, "-b", slot.box, "-r", "golden", "--mount", "--json")
    assert r.code == 0, r
    step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "restore")
    assert step["clear"]["method"] == "delete", step
    assert os.listdir(os.path.join(slot.mnt, "lost+found")) == []
    vmim("--config", cfg, "-b", slot.box, "--release")


def test_a_tree_restore_empties_lost_found_too(vmim, slot):
    slot.make(200, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config()
    tree = slot.images / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("tree\n")
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    with open(os.path.join(slot.mnt, "lost+found", "left"), "w") as fh:
        fh.write("old\n")
    r = vmim("--config", cfg, "-b", slot.box, "-r", "tree", "--mount")
    assert r.code == 0, r
    assert os.listdir(os.path.join(slot.mnt, "lost+found")) == []
    assert sorted(os.listdir(slot.mnt)) == ["etc", "lost+found"]
    vmim("--config", cfg, "-b", slot.box, "--release")


@pytest.mark.parametrize("resuid", [0, 65534])
def test_an_image_that_needs_the_reserve_is_refused_before_the_clear_where_it_cannot_use_it(
        vmim, slot, resuid):
    """The unpack (root in the sandbox) writes the blocks ext4 reserves when they are root's
    (resuid 0, the default) or with CAP_SYS_RESOURCE, which a host's capability bounding set
    may lack (this machine's does): with the reserve another user's, the check before the
    clear counted it, and the restore cleared the slot, then ran out of space (exit 6, an
    attack of 2026-12-07). Where the unpack may write the reserve, the image is restored."""
    import gzip

    from vmim import sandbox

    slot.make(64, ["mkfs.ext4", "-q", "-F", "-m", "20"],  # 54.7 MiB, 40.6 MiB not reserved
              ["tune2fs", "-u", str(resuid)])
    cfg = slot.config()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tf:
        data = os.urandom(46 * MiB)
        info = tarfile.TarInfo("big")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (slot.images / "big").write_bytes(buf.getvalue())
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    with open(os.path.join(slot.mnt, "marker"), "w") as fh:
        fh.write("before\n")
    r = vmim("--config", cfg, "-b", slot.box, "-r", "big", "--mount")
    if sandbox.keeps("CAP_SYS_RESOURCE") or resuid == 0:
        assert r.code == 0, r
        assert os.path.getsize(os.path.join(slot.mnt, "big")) == 46 * MiB
    else:
        assert r.code == 4 and "reserves for another user" in r.err, r
        assert "not touched" in r.err, r
        r = vmim("--config", cfg, "-b", slot.box, "--mount")  # the failure released it
        assert r.code == 0, r
        with open(os.path.join(slot.mnt, "marker")) as fh:
            assert fh.read() == "before\n"
    vmim("--config", cfg, "-b", slot.box, "--release")


def test_a_cpio_image_larger_than_the_slot_is_refused_before_the_clear(vmim, slot):
    """newc stores every byte; the proof now counts the data its extractor writes (not its
    zero blocks): 60 MiB of data into a 54.7 MiB filesystem is refused, the slot untouched
    (it was cleared, then ran out of space: an attack of 2026-12-07)."""
    import subprocess

    from tests.archives import newc_of

    slot.make(64, ["mkfs.ext4", "-q", "-F"])
    cfg = slot.config()
    body = b"\x01" * (60 * MiB)
    (slot.images / "big").write_bytes(subprocess.run(
        ["zstd", "-q", "-c"], input=newc_of([(3, 0o100644, 1, b"big", body)]),
        capture_output=True, check=True).stdout)
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    with open(os.path.join(slot.mnt, "marker"), "w") as fh:
        fh.write("before\n")
    r = vmim("--config", cfg, "-b", slot.box, "-r", "big", "--mount")
    assert r.code == 4 and "more than" in r.err and "not touched" in r.err, r
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    with open(os.path.join(slot.mnt, "marker")) as fh:
        assert fh.read() == "before\n"
    vmim("--config", cfg, "-b", slot.box, "--release")
