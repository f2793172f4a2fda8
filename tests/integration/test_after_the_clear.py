"""What a proof passes, the restore completes: images (hostile or only odd) that passed the
proof and then failed after the slot was cleared, leaving it empty and marked incomplete, or
that lost data without a word. Found by an attack on the main of 2026-12-07 (e8a7946): each
test failed there. Real loop-mounted ext4 slots, through the CLI."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import subprocess
import tarfile

import pytest

from tests.archives import newc_of, tar_entries
from tests.integration.test_images import run_ok

DIR, FILE, LINK = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE


def _tar(*members):
    """A tar.gz of "." with a marker file and these (name, type, data, linkname) members."""
    entries = [(".", DIR, b"", "", {}), ("./marker", FILE, b"restored\n", "", {}),
               *((n, t, d, ln, {}) for n, t, d, ln in members)]
    return subprocess.run(["gzip", "-c"], input=tar_entries(entries), capture_output=True,
                          check=True).stdout


def _slot(vmim, rig, key="ext4"):
    """The slot's root after a run: {name: content or "dir"/"link -> T"} of what is there, and
    the restore mark."""
    run_ok(vmim, rig, "-b", rig.names[key], "--mount")
    root = rig.mnt(key)
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                seen[rel] = "link -> " + os.readlink(p)
            elif os.path.isdir(p):
                seen[rel] = "dir"
            else:
                seen[rel] = open(p, "rb").read()
    run_ok(vmim, rig, "-b", rig.names[key], "--release")
    rows = json.loads(vmim("-l", "--json", "--config", rig.cfg).out)["boxes"]
    mark = next(b["incomplete"] for b in rows if b["name"] == rig.names[key])
    return seen, mark


def test_a_hard_link_into_the_images_lost_found_is_restored(vmim, rig):
    """fsck leaves an orphan's name in lost+found; `tar -C /mnt -cf x.tar .` keeps it, and a
    name elsewhere linked to it comes as a hard link to it. The restore left lost+found out
    and GNU tar failed on the link ("Cannot hard link"), after the clear."""
    (rig.images / "fscked").write_bytes(_tar(
        ("./lost+found", DIR, b"", ""), ("./lost+found/#12", FILE, b"data\n", ""),
        ("./etc/passwd", LINK, b"", "./lost+found/#12")))
    r = vmim("-b", rig.names["ext4"], "-r", "fscked", "--config", rig.cfg)
    assert r.code == 0, r
    seen, mark = _slot(vmim, rig)
    assert mark is None
    assert seen["etc/passwd"] == b"data\n" and seen["marker"] == b"restored\n"
    assert not any(k.startswith("lost+found/") for k in seen)  # the slot's own, empty


def test_cpio_data_carried_by_a_name_in_lost_found_is_restored(vmim, rig, tmp_path):
    """GNU cpio writes a hard link group's data with its last name; when that name was in
    lost+found, the restore skipped it and /bin/x came back empty, exit 0."""
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "lost+found").mkdir()
    (src / "marker").write_text("restored\n")
    (src / "bin" / "x").write_bytes(b"important data\n")
    os.link(src / "bin" / "x", src / "lost+found" / "#12")
    names = b"\0".join([b".", b"./marker", b"./bin", b"./bin/x", b"./lost+found",
                        b"./lost+found/#12"]) + b"\0"
    data = subprocess.run(["cpio", "-o", "-0", "-H", "newc", "--quiet"], cwd=src, input=names,
                          capture_output=True, check=True).stdout
    (rig.images / "fscked").write_bytes(
        subprocess.run(["bzip2", "-c"], input=data, capture_output=True, check=True).stdout)
    r = vmim("-b", rig.names["ext4"], "-r", "fscked", "--config", rig.cfg)
    assert r.code == 0, r
    seen, mark = _slot(vmim, rig)
    assert mark is None
    assert seen["bin/x"] == b"important data\n"
    assert not any(k.startswith("lost+found/") for k in seen)


def test_a_directory_at_sourceimage_is_kept_with_a_warning(vmim, rig):
    """sourceimage = true (the rig's ext4 slot) and an image, or a guest stored by the tool,
    with a directory at /sourceimage: the restore failed (exit 4, "untouched") after it had
    replaced the slot's content."""
    (rig.images / "img").write_bytes(_tar(("./sourceimage", DIR, b"", ""),
                                          ("./sourceimage/kept", FILE, b"guest's\n", "")))
    r = vmim("-b", rig.names["ext4"], "-r", "img", "--config", rig.cfg)
    assert r.code == 0, r
    assert "directory at /sourceimage" in r.err and "warning" in r.err.lower()
    seen, mark = _slot(vmim, rig)
    assert mark is None
    assert seen["sourceimage/kept"] == b"guest's\n" and seen["marker"] == b"restored\n"


def test_an_entry_named_like_the_staging_directory(vmim, rig):
    """The restore unpacks into /.vmim-restore.PID; an image entry of that name (the pid is
    this test's: the command runs in this process) met the staging directory itself when
    moved to the root: "a directory is there", after the clear."""
    name = f".vmim-restore.{os.getpid()}"
    (rig.images / "img").write_bytes(_tar((f"./{name}", FILE, b"the image's\n", "")))
    r = vmim("-b", rig.names["ext4"], "-r", "img", "--config", rig.cfg)
    assert r.code == 0, r
    seen, mark = _slot(vmim, rig)
    assert mark is None
    assert seen[name] == b"the image's\n" and seen["marker"] == b"restored\n"
    assert not [k for k in seen if k.startswith(".vmim-") and k != name]  # no staging left


def test_an_insert_into_its_own_staging_directory_is_refused(vmim, rig):
    """A guest symlink /opt -> /.vmim-insert.PID (dangling when the guest made it): -i X:/opt
    merged the staging directory into itself, removed it with everything in it, and said
    "1 entry", exit 0."""
    (rig.inserts / "certs").write_bytes(subprocess.run(
        ["gzip", "-c"], input=tar_entries([("./ca.pem", FILE, b"cert\n", "", {})]),
        capture_output=True, check=True).stdout)
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    os.symlink(f"/.vmim-insert.{os.getpid()}", os.path.join(rig.mnt("ext4"), "opt"))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
    r = vmim("-b", rig.names["ext4"], "-i", "certs:/opt", "--config", rig.cfg)
    assert r.code == 1, r
    assert "staging directory" in r.err and "/opt" in r.err
    seen, _ = _slot(vmim, rig)
    assert seen["opt"] == f"link -> /.vmim-insert.{os.getpid()}"
    assert not [k for k in seen if k.startswith(".vmim-")]  # the staging directory removed
    assert not any(k.endswith("ca.pem") for k in seen)


def _newc_bz2(*extra):
    root = [(1, stat.S_IFDIR | 0o755, 2, b".", b""),
            (2, stat.S_IFREG | 0o644, 1, b"marker", b"restored\n")]
    return subprocess.run(["bzip2", "-c"], input=newc_of([*root, *extra]), capture_output=True,
                          check=True).stdout


def _tar_device(major, minor):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, typ in ((".", DIR), ("./marker", FILE), ("./dev", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = typ, 0o755 if typ == DIR else 0o644
            info.devmajor, info.devminor = major, minor
            data = b"restored\n" if typ == FILE else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return subprocess.run(["gzip", "-c"], input=buf.getvalue(), capture_output=True,
                          check=True).stdout


LIMITS = {
    "tar: a device of major 5000": ("ext4", lambda: _tar_device(5000, 1), "Linux cannot make"),
    "tar: a symlink target of 5000 bytes": (
        "ext4", lambda: _tar(("./link", tarfile.SYMTYPE, b"", "x/" * 2500)), "5000 bytes"),
    "tar: a symlink target of 2000 bytes, xfs keeps 1024": (
        "xfs", lambda: _tar(("./link", tarfile.SYMTYPE, b"", "x/" * 1000)), "xfs keeps 1024"),
    "tar: a name of 5000 bytes (deeper than PATH_MAX)": (
        "ext4", lambda: _tar(("./" + "d/" * 2500 + "f", FILE, b"x", "")), "4095"),
    "tar: 65001 hard links to one file": (
        "ext4", lambda: _tar(("./f", FILE, b"x", ""),
                             *((f"./h{i}", LINK, b"", "./f") for i in range(65001))), "65002 names"),
    "tar: 20000 files into 4096 inodes": (
        "small", lambda: _tar(*((f"./f{i}", FILE, b"", "") for i in range(20000))), "inodes"),
    "newc: a name of 300 bytes": (
        "ext4", lambda: _newc_bz2((3, stat.S_IFREG | 0o644, 1, b"a" * 300, b"x")), "300 bytes"),
    "newc: a symlink target of 5000 bytes": (
        "ext4", lambda: _newc_bz2((3, stat.S_IFLNK | 0o777, 1, b"link", b"x/" * 2500)),
        "5000 bytes"),
    "newc: a device of major 0x100000": (
        "ext4", lambda: _newc_bz2((3, stat.S_IFCHR | 0o644, 1, b"dev", b"", (0x100000, 1))),
        "Linux cannot make"),
    "newc: a device of major and minor 0xffffffff": (
        "ext4", lambda: _newc_bz2((3, stat.S_IFCHR | 0o644, 1, b"dev", b"",
                                   (0xFFFFFFFF, 0xFFFFFFFF))), "Linux cannot make"),
}


@pytest.mark.parametrize("case", sorted(LIMITS))
def test_what_the_kernel_or_the_filesystem_refuses_is_refused_before_the_clear(vmim, rig, case):
    """Archives GNU tar and the newc reader read without a word, whose unpack the kernel or the
    filesystem refuses (ENAMETOOLONG, EINVAL, EMLINK, ENOSPC of inodes): exit 4 and the slot
    as it was (vmim.archive.fits). On e8a7946 each cleared the slot, then failed."""
    key, make, said = LIMITS[case]
    (rig.images / "odd").write_bytes(make())
    r = vmim("-b", rig.names[key], "-r", "odd", "--config", rig.cfg)
    assert r.code == 4, r
    assert said in r.err
    seen, mark = _slot(vmim, rig, key)
    assert mark is None and seen["marker"] == f"{key} slot\n".encode()


def test_a_device_the_kernel_makes_is_restored(vmim, rig):
    """The bound is the kernel's: major 4095, minor 2^20 - 1 is made."""
    (rig.images / "dev").write_bytes(_newc_bz2(
        (3, stat.S_IFCHR | 0o644, 1, b"dev", b"", (4095, (1 << 20) - 1))))
    r = vmim("-b", rig.names["ext4"], "-r", "dev", "--config", rig.cfg)
    assert r.code == 0, r
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    st = os.lstat(os.path.join(rig.mnt("ext4"), "dev"))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4095, (1 << 20) - 1)


def _deep(root, depth=1200):
    """A tree deeper than PATH_MAX, made one directory at a time (as a guest can)."""
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d" * 10, dir_fd=fd)
        n = os.open("d" * 10, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = n
    f = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(f, b"deep\n")
    os.close(f)
    os.close(fd)


@pytest.mark.parametrize("flag", ["--zstd", "-w"])
def test_a_guest_tree_gnu_tar_could_not_unpack_is_not_stored(vmim, rig, flag):
    """GNU tar archives a tree deeper than PATH_MAX (through directory descriptors) and cannot
    unpack it: on e8a7946 the store succeeded, and every restore of the image (proven by its
    digest) cleared its slot, then failed. cpio cannot archive it: the store's walk of the
    tree (os.walk) died of Python's RecursionError on the main of 2026-12-07."""
    run_ok(vmim, rig, "-b", rig.names["src"], "--mount")
    _deep(rig.mnt("src"))
    r = vmim("-b", rig.names["src"], flag, "-s", "golden", "--release", "--config", rig.cfg)
    assert r.code == 4, r
    assert "4095" in r.err and "nothing was stored" in r.err
    assert not any(n.startswith("golden") for n in os.listdir(rig.images))
    assert not [n for n in os.listdir(rig.images) if not n.startswith(".")]  # no debris


@pytest.mark.parametrize("flag", ["--zstd", "-w"])
def test_an_image_proven_by_its_digest_is_checked_against_the_slot_as_recorded(vmim, rig, flag):
    """A golden image from a slot with more files than a smaller slot has inodes: proven by the
    digest its store recorded, it was not read again, and its restore cleared the small slot,
    then ran out of inodes. The store records the shape of what it archived (tar: from GNU
    tar's listing; cpio.bz2: from the survey of the tree; on the main of 2026-12-07 a cpio
    image still cleared the slot, then failed)."""
    run_ok(vmim, rig, "-b", rig.names["src"], "--mount")
    many = os.path.join(rig.mnt("src"), "many")
    os.mkdir(many)
    for i in range(6000):
        open(os.path.join(many, str(i)), "w").close()
    run_ok(vmim, rig, "-b", rig.names["src"], flag, "-s", "golden", "--release")
    meta = json.loads(next((rig.images / ".vmim").glob("golden*")).read_text())
    assert meta["shape"]["inodes"] >= 6000
    r = vmim("-b", rig.names["small"], "-r", "golden", "--config", rig.cfg)
    assert r.code == 4, r
    assert "inodes" in r.err and "not touched" in r.err
    seen, mark = _slot(vmim, rig, "small")
    assert mark is None and seen["marker"] == b"small slot\n"
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--config", rig.cfg)  # room enough there
    assert r.code == 0, r


@pytest.mark.parametrize("flag", ["-w", "--zstd"])
@pytest.mark.parametrize("proof", ["digest", "full read"])
def test_a_tree_that_uses_every_inode_is_refused_before_the_clear(vmim, rig, flag, proof):
    """The restore's staging directory takes an inode beside the image's: a tree that used
    every inode of its slot, restored into that slot, cleared it and then failed (cpio: both
    proofs; tar: the full read; attack G of 2026-12-07). It is refused, the slot as it was."""
    small = rig.names["small"]
    run_ok(vmim, rig, "-b", small, "--mount")
    many = os.path.join(rig.mnt("small"), "many")
    os.mkdir(many)
    made = 0
    while True:
        try:
            open(os.path.join(many, str(made)), "w").close()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        made += 1
    assert os.statvfs(rig.mnt("small")).f_ffree == 0
    run_ok(vmim, rig, "-b", small, flag, "-s", "full", "--release")
    if proof == "full read":
        for meta in (rig.images / ".vmim").glob("full*"):
            meta.unlink()
    r = vmim("-b", small, "-r", "full", "--config", rig.cfg)
    assert r.code == 4, r
    assert "staging directory" in r.err and "not touched" in r.err, r
    seen, mark = _slot(vmim, rig, "small")
    assert mark is None and seen["marker"] == b"small slot\n"
    assert sum(1 for k in seen if k.startswith("many/")) == made
