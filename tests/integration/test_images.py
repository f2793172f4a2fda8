"""Store, restore, insert and extract on real loop-mounted ext4 and xfs slots."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from tests.integration import diskimages as di
from tests.integration import treecmp
from vmim import digest
from vmim.disk import loop, mounts

FORMATS = {"rsync": "-y", "tgz": "-z", "cpio.bz2": "-w", "tar.zst": "--zstd"}


class Rig:
    def __init__(self, root, cfg, names, images, inserts):
        self.root = root
        self.cfg = cfg
        self.names = names
        self.images = images
        self.inserts = inserts

    def mnt(self, key):
        return str(self.root / "mnt" / self.names[key])

    def disk(self, key):
        return str(self.root / f"{key}.img")


@pytest.fixture(scope="module")
def blank_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("blank")
    di.partitioned_image(str(d / "src.img"), "gpt", [200], ["ext4"])
    di.filesystem_image(str(d / "xfs.img"), "xfs", 320, "xfs slot")
    di.filesystem_image(str(d / "ext4.img"), "ext4", 200, "ext4 slot")
    di.filesystem_image(str(d / "small.img"), "ext4", 16, "small slot")
    return d


@pytest.fixture
def rig(tmp_path, blank_images, write_config, domains):
    os.chmod(tmp_path, 0o755)
    for n in ("src", "xfs", "ext4", "small"):
        subprocess.run(["cp", "--sparse=always", str(blank_images / f"{n}.img"),
                        str(tmp_path / f"{n}.img")], check=True)
    images, inserts = tmp_path / "images", tmp_path / "inserts"
    images.mkdir()
    inserts.mkdir()
    names = {k: domains.name(k) for k in ("src", "xfs", "ext4", "small")}
    cfg = write_config(f"""\
    [vmim.local]
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    vmimages = "{images}"
    vminserts = "{inserts}"
    [vmim.vm.src]
    HostName = "{names['src']}"
    HostDisk = "{tmp_path}/src.img"
    partition = 1
    [vmim.vm.xfs]
    HostName = "{names['xfs']}"
    root = "{tmp_path}/xfs.img"
    [vmim.vm.ext4]
    HostName = "{names['ext4']}"
    root = "{tmp_path}/ext4.img"
    sourceimage = true
    [vmim.vm.small]
    HostName = "{names['small']}"
    root = "{tmp_path}/small.img"
    """)
    r = Rig(tmp_path, cfg, names, images, inserts)
    yield r
    # every test leaves its slots released; the leak check proves it
    for k in names:
        subprocess.run([sys.executable, "-m", "vmim", "--config", cfg, "-b", names[k],
                        "--release"], capture_output=True)


def run_ok(vmim, rig, *argv):
    r = vmim(*argv, "--config", rig.cfg)
    assert r.code == 0, r
    return r


def populate(vmim, rig, key="src"):
    run_ok(vmim, rig, "-b", rig.names[key], "--mount")
    treecmp.build(rig.mnt(key))


# ------------------------------------------------------------------ fidelity


@pytest.mark.parametrize("target", ["xfs", "ext4"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_store_then_restore_is_faithful(vmim, rig, fmt, target):
    populate(vmim, rig)
    resolution = 10**9 if fmt == "cpio.bz2" else 1  # cpio keeps whole seconds
    before = treecmp.snapshot(rig.mnt("src"), mtime_resolution=resolution)
    r = run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-s", "golden", "--release")
    if fmt == "cpio.bz2":
        assert "does not carry xattrs and POSIX ACLs" in r.err
        before = treecmp.without_xattrs(before)
    # the target holds stale content, root dotfiles included, that the restore must remove
    run_ok(vmim, rig, "-b", rig.names[target], "--mount")
    with open(os.path.join(rig.mnt(target), ".stale-dotfile"), "w") as fh:
        fh.write("old\n")
    run_ok(vmim, rig, "-b", rig.names[target], "--release")

    run_ok(vmim, rig, "-b", rig.names[target], "-r", "golden", "--mount")
    after = treecmp.snapshot(rig.mnt(target), mtime_resolution=resolution,
                             skip_root_names=(b"lost+found", b"sourceimage"))
    assert treecmp.differences(before, after) == []
    assert after[b"var-sparse"]["sparse"] is True
    assert after[b"var/lib/lost+found/keep"]["sha256"]  # lost+found below the root is kept
    if target == "ext4":
        with open(os.path.join(rig.mnt(target), "sourceimage")) as fh:
            assert fh.read() == "golden\n"
    run_ok(vmim, rig, "-b", rig.names[target], "--release")


def test_parallel_compressors_output_reads_with_the_plain_tools(vmim, rig):
    populate(vmim, rig)
    for fmt, plain in (("tgz", ["gzip", "-dc"]), ("cpio.bz2", ["bzip2", "-dc"]),
                       ("tar.zst", ["zstd", "-dc"])):
        run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-s", f"img.{fmt}")
        res = subprocess.run([*plain, str(rig.images / f"img.{fmt}")], capture_output=True)
        assert res.returncode == 0 and len(res.stdout) > 64 * 1024
    run_ok(vmim, rig, "-b", rig.names["src"], "--release")


def test_restore_with_mkfs_keeps_uuid_and_label(vmim, rig, write_config):
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "--zstd", "-s", "golden", "--release")
    uuid_before = di.run("blkid", "-p", "-s", "UUID", "-o", "value", rig.disk("xfs")).strip()
    cfg = open(rig.cfg).read().replace(f'root = "{rig.root}/xfs.img"',
                                       f'root = "{rig.root}/xfs.img"\nclear = "mkfs"')
    open(rig.cfg, "w").write(cfg)
    run_ok(vmim, rig, "-b", rig.names["xfs"], "--mount")
    with open(os.path.join(rig.mnt("xfs"), "stale"), "w") as fh:
        fh.write("x")
    r = run_ok(vmim, rig, "-b", rig.names["xfs"], "-r", "golden", "-v")
    assert "clearing (mkfs)" in r.err
    assert not os.path.exists(os.path.join(rig.mnt("xfs"), "stale"))
    assert os.path.exists(os.path.join(rig.mnt("xfs"), "etc", "hostname"))
    run_ok(vmim, rig, "-b", rig.names["xfs"], "--release")
    assert di.run("blkid", "-p", "-s", "UUID", "-o", "value", rig.disk("xfs")).strip() == uuid_before
    assert di.run("blkid", "-p", "-s", "LABEL", "-o", "value", rig.disk("xfs")).strip() == "bare"


# ------------------------------------------------------------------ inserts and extracts


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_extract_then_insert_puts_files_back_where_they_were(vmim, rig, fmt):
    populate(vmim, rig)
    before = treecmp.snapshot(os.path.join(rig.mnt("src"), "home"))
    run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-e", "homes:/home",
           "-e", "etc", "--extract-directory", "/etc")
    assert (rig.inserts / "homes").exists() and (rig.inserts / "etc").exists()
    subprocess.run(["rm", "-rf", os.path.join(rig.mnt("src"), "home")], check=True)
    run_ok(vmim, rig, "-b", rig.names["src"], "-i", "homes", "--release")
    run_ok(vmim, rig, "-b", rig.names["src"], "--mount")
    after = treecmp.snapshot(os.path.join(rig.mnt("src"), "home"))
    if fmt == "cpio.bz2":
        before, after = treecmp.without_xattrs(before), treecmp.without_xattrs(after)
        res = 10**9
        before = {k: {**v, "mtime": v["mtime"] // res} for k, v in before.items()}
        after = {k: {**v, "mtime": v["mtime"] // res} for k, v in after.items()}
    assert treecmp.differences(before, after) == []
    run_ok(vmim, rig, "-b", rig.names["src"], "--release")


def test_inserts_apply_in_order_and_at_a_directory(vmim, rig):
    for name, content in (("first", b"one\n"), ("second", b"two\n")):
        with tarfile.open(rig.inserts / name, "w:gz") as t:
            info = tarfile.TarInfo("conf/value")
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-i", "first:/etc/app", "-i", "second:/etc/app")
    with open(os.path.join(rig.mnt("ext4"), "etc", "app", "conf", "value")) as fh:
        assert fh.read() == "two\n"
    assert open(os.path.join(rig.mnt("ext4"), "marker")).read() == "bare ext4\n".replace(
        "bare ext4", "ext4 slot")  # the rest of the guest is untouched
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_insert_without_directory_entries_keeps_existing_directories_as_they_are(vmim, rig):
    """An archive holding only home/alice/.ssh/authorized_keys (no entries for /, /home or
    /home/alice): the guest's existing directories keep their owner and mode."""
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    guest = rig.mnt("ext4")
    alice = os.path.join(guest, "home", "alice")
    os.makedirs(alice)
    os.chown(alice, 1000, 1000)
    os.chmod(alice, 0o700)
    os.chmod(guest, 0o755)
    with tarfile.open(rig.inserts / "keys", "w:gz") as t:
        info = tarfile.TarInfo("home/alice/.ssh/authorized_keys")
        info.size = 9
        info.uid = info.gid = 1000
        t.addfile(info, io.BytesIO(b"ssh-ed25\n"))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-i", "keys")
    st = os.stat(alice)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o700)
    assert os.stat(guest).st_mode & 0o7777 == 0o755
    key = os.path.join(alice, ".ssh", "authorized_keys")
    assert open(key).read() == "ssh-ed25\n" and os.stat(key).st_uid == 1000
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


# ------------------------------------------------------------------ never outside the guest


def _hostile_tar(path, outside):
    with tarfile.open(path, "w:gz") as t:
        def add(name, data=b"pwned\n", **kw):
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
        add("escape", type=tarfile.SYMTYPE, linkname=str(outside))
        add("escape/through-symlink")
        add("../dotdot")
        add(f"{outside}/absolute")


def _hostile_cpio(path, outside, work):
    """newc: a symlink member, then a file through it (GNU cpio follows it)."""
    a, b = work / "a", work / "b"
    a.mkdir()
    b.mkdir()
    os.symlink(outside, a / "escape")
    (b / "escape").mkdir()
    (b / "escape" / "through-symlink").write_text("pwned\n")
    first = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=a, input=b"escape\n",
                           capture_output=True, check=True).stdout
    second = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=b,
                            input=b"escape/through-symlink\n", capture_output=True,
                            check=True).stdout
    trailer = first.rfind(b"070701", 0, first.find(b"TRAILER!!!"))
    data = subprocess.run(["bzip2", "-c"], input=first[:trailer] + second, capture_output=True,
                          check=True).stdout
    path.write_bytes(data)


@pytest.mark.parametrize("kind", ["tar", "cpio"])
@pytest.mark.parametrize("how", ["-r", "-i"])
def test_hostile_archives_write_nothing_outside_the_guest(vmim, rig, tmp_path, kind, how):
    outside = tmp_path / "host-outside"
    outside.mkdir()
    store = rig.images if how == "-r" else rig.inserts
    if kind == "tar":
        _hostile_tar(store / "hostile", outside)
    else:
        work = tmp_path / "work"
        work.mkdir()
        _hostile_cpio(store / "hostile", outside, work)
    r = vmim("-b", rig.names["ext4"], how, "hostile", "--config", rig.cfg)
    assert r.code != 0, r
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "dotdot").exists() and not (rig.root / "mnt" / "dotdot").exists()
    assert mounts.mounted_at(rig.mnt("ext4")) is None  # a failed box is released


def test_absolute_directory_symlinks_in_the_guest_resolve_inside_it(vmim, rig, tmp_path):
    """A guest `var/run -> /run`-style link whose target also exists on the host: the insert
    lands in the guest's directory, never the host's."""
    host_dir = tmp_path / "host-run"
    host_dir.mkdir()
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    guest = rig.mnt("ext4")
    os.makedirs(guest + str(host_dir))  # the same path, inside the guest
    os.makedirs(os.path.join(guest, "var"), exist_ok=True)  # (a test dir under /var)
    os.symlink(str(host_dir), os.path.join(guest, "var", "run"))  # absolute guest symlink
    with tarfile.open(rig.inserts / "runfiles", "w:gz") as t:
        info = tarfile.TarInfo("var/run/daemon.pid")
        info.size = 4
        t.addfile(info, io.BytesIO(b"123\n"))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-i", "runfiles")
    assert list(host_dir.iterdir()) == []
    assert open(guest + str(host_dir) + "/daemon.pid").read() == "123\n"
    assert os.path.islink(os.path.join(guest, "var", "run"))  # the guest's link is kept
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_rsync_restore_over_a_guest_with_an_absolute_symlink(vmim, rig, tmp_path):
    host_dir = tmp_path / "host-data"
    host_dir.mkdir()
    image = rig.images / "tree"
    (image / "data").mkdir(parents=True)
    (image / "data" / "file").write_text("image\n")
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    os.symlink(str(host_dir), os.path.join(rig.mnt("ext4"), "data"))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "tree")
    assert list(host_dir.iterdir()) == []
    assert open(os.path.join(rig.mnt("ext4"), "data", "file")).read() == "image\n"
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_rsync_restore_replaces_a_file_the_guest_changed_and_gave_back_its_size_and_mtime(
        vmim, rig):
    """rsync's quick check trusts size and mtime, which the guest sets at will: a file it
    changed (a trojan of the same size, its mtime put back) survived every restore of a tree
    (an attack of 2026-12-07). The restore compares content."""
    image = rig.images / "tree"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "login").write_bytes(b"the real login\n")
    os.utime(image / "bin" / "login", (1_600_000_000, 1_600_000_000))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "tree")
    login = os.path.join(rig.mnt("ext4"), "bin", "login")
    with open(login, "r+b") as fh:
        fh.write(b"the evil login\n")
    os.utime(login, (1_600_000_000, 1_600_000_000))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "tree")
    with open(login, "rb") as fh:
        assert fh.read() == b"the real login\n"
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


# ------------------------------------------------------------------ bad input


def _marker(vmim, rig, key):
    run_ok(vmim, rig, "-b", rig.names[key], "--mount")
    with open(os.path.join(rig.mnt(key), "marker")) as fh:
        text = fh.read()
    run_ok(vmim, rig, "-b", rig.names[key], "--release")
    return text


def test_missing_image_lists_similar_names(vmim, rig):
    (rig.images / "golden-2026").write_text("x")
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--config", rig.cfg)
    assert r.code == 4, r
    assert "image 'golden' not found" in r.err and "golden-2026" in r.err
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


def test_unrecognised_image_leaves_the_slot_untouched(vmim, rig):
    (rig.images / "notes").write_text("just text\n")
    r = vmim("-b", rig.names["ext4"], "-r", "notes", "--config", rig.cfg)
    assert r.code == 4 and "not an image" in r.err
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


def _noise(rig):
    """2 MiB that do not compress, in the source slot: its image's start is far from its
    end (a byte changed there is for the digest to see, not for the plan's look at the start)."""
    with open(os.path.join(rig.mnt("src"), "noise"), "wb") as fh:
        fh.write(os.urandom(2 << 20))


def _corrupt(path):
    """A byte of the image changed near its end, where its start still reads as what it was
    (the plan does not see it: only the digest does)."""
    data = bytearray(path.read_bytes())
    data[-16] ^= 0xFF
    st = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the bytes


@pytest.mark.parametrize("fmt", ["tgz", "cpio.bz2", "tar.zst"])
def test_corrupt_stored_archive_is_refused_before_the_slot_is_touched(vmim, rig, fmt):
    populate(vmim, rig)
    _noise(rig)
    run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-s", "golden", "--release")
    _corrupt(rig.images / "golden")
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--json", "--config", rig.cfg)
    assert r.code == 4, r
    assert "corrupt" in r.err and f"{digest.preferred()} digest differs" in r.err
    # the slot was mounted while the digest was checked: the failure released it
    steps = [s["step"] for s in json.loads(r.out)["results"][0]["steps"]]
    assert steps == ["verify", "mount", "restore", "release"], steps
    assert mounts.mounted_at(rig.mnt("ext4")) is None
    rows = json.loads(vmim("-l", "--json", "--config", rig.cfg).out)["boxes"]
    assert next(b["incomplete"] for b in rows if b["name"] == rig.names["ext4"]) is None
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


def test_a_corrupt_image_never_stops_the_running_domain(vmim, rig, domains):
    """The digest is checked beside the mount only where the mount comes next: a running
    domain's restore shuts it down first, so its verify checks at once, and a corrupt image
    leaves the domain running."""
    populate(vmim, rig)
    _noise(rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "--zstd", "-s", "golden", "--release")
    _corrupt(rig.images / "golden")
    domains.define(rig.names["ext4"], start=True, disk=rig.disk("ext4"))
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--json", "--config", rig.cfg)
    assert r.code == 4, r
    assert f"{digest.preferred()} digest differs" in r.err
    steps = [s["step"] for s in json.loads(r.out)["results"][0]["steps"]]
    assert steps == ["verify"], steps  # checked at once: the shutdown comes next
    assert domains.conn.lookupByName(rig.names["ext4"]).isActive()
    # asked to stop it (-d, -k): the image is proven before that too
    for stop in ("-d", "-k"):
        r = vmim("-b", rig.names["ext4"], stop, "--timeout", "1", "-r", "golden", "--json",
                 "--config", rig.cfg)
        assert r.code == 4 and "digest differs" in r.err, r
        assert [s["step"] for s in json.loads(r.out)["results"][0]["steps"]] == ["verify"]
        assert domains.conn.lookupByName(rig.names["ext4"]).isActive()
    domains.conn.lookupByName(rig.names["ext4"]).destroy()
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


def _as_stored_by_1_0(rig, name):
    """Rewrite an image's metadata as 1.0 wrote it: its sha256, no other digest."""
    path = rig.images / ".vmim" / f"{name}.json"
    meta = json.loads(path.read_text())
    for algorithm in digest.ALGORITHMS:
        meta.pop(algorithm, None)
    meta["sha256"] = hashlib.sha256((rig.images / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(meta))


def test_an_image_with_the_sha256_of_1_0_still_verifies_and_restores(vmim, rig):
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "--zstd", "-s", "golden", "--release")
    _as_stored_by_1_0(rig, "golden")
    assert list(json.loads((rig.images / ".vmim" / "golden.json").read_text())) \
        .count("sha256") == 1
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "golden")
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    try:
        with open(os.path.join(rig.mnt("ext4"), "etc", "hostname")) as fh:
            assert fh.read() == "guest\n"
        with open(os.path.join(rig.mnt("ext4"), "marker")) as fh:
            assert fh.read() != "ext4 slot\n"  # the source slot's
    finally:
        run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_a_corrupt_image_of_1_0_is_refused_by_its_sha256(vmim, rig):
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "--zstd", "-s", "golden", "--release")
    _as_stored_by_1_0(rig, "golden")
    path = rig.images / "golden"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--config", rig.cfg)
    assert r.code == 4, r
    assert "corrupt" in r.err and "sha256 digest differs" in r.err
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


@pytest.mark.parametrize("fmt", ["tgz", "cpio.bz2", "tar.zst"])
def test_truncated_archive_without_metadata_is_refused(vmim, rig, fmt):
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-s", "golden", "--release")
    path = rig.images / "golden"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # metadata no longer matches
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--config", rig.cfg)
    assert r.code == 4, r
    assert "corrupt or truncated" in r.err
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


def test_image_store_missing_or_read_only(vmim, rig):
    os.rmdir(rig.images)
    r = vmim("-b", rig.names["src"], "-s", "x", "--config", rig.cfg)
    assert r.code == 4 and "does not exist" in r.err
    rig.images.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(rig.images)],
                   check=True)
    try:
        r = vmim("-b", rig.names["src"], "-s", "x", "--config", rig.cfg)
        assert r.code == 4 and "not writable" in r.err, r
    finally:
        subprocess.run(["umount", str(rig.images)], check=True)


def as_stored_by_a_release_that_recorded_no_shape(rig, name):
    """The image's metadata without the shape of its tree: a restore proven by the digest
    then learns the bytes only as it writes them (one with the shape is refused before the
    clear: test_trust.py)."""
    path = rig.images / ".vmim" / f"{name}.json"
    meta = json.loads(path.read_text())
    del meta["shape"]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("flag", ["-z", "-w"])
def test_disk_full_during_restore_reports_the_slot_incomplete(vmim, rig, domains, flag):
    """Exit 6 whatever unpacks the image: GNU tar, or the newc extractor in the sandbox (exit
    1 on the main of 2026-12-07: its ENOSPC crossed as an unexpected error)."""
    run_ok(vmim, rig, "-b", rig.names["src"], "--mount")
    with open(os.path.join(rig.mnt("src"), "big"), "wb") as fh:
        fh.write(os.urandom(40 * 1024 * 1024))  # more than the 16 MiB slot holds
    run_ok(vmim, rig, "-b", rig.names["src"], flag, "-s", "big", "--release")
    as_stored_by_a_release_that_recorded_no_shape(rig, "big")
    r = vmim("-b", rig.names["small"], "-r", "big", "-u", "--config", rig.cfg)
    assert r.code == 6, r
    assert "the slot's filesystem is full" in r.err and "incomplete" in r.err
    assert rig.names["small"] not in [d.name() for d in domains.conn.listAllDomains()]
    assert mounts.mounted_at(rig.mnt("small")) is None
    assert loop.loops_backed_by(rig.disk("small")) == []


def test_names_with_shell_metacharacters_are_data(vmim, rig, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a shell would create the canary
    canary = tmp_path / "canary"
    name = "x; touch canary; $(touch canary) `touch canary` 'q' \"q\" * & |"
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "-z", "-s", name, "--release")
    assert (rig.images / name).is_file()
    assert not canary.exists()
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", name, "--release")
    assert not canary.exists()


# ------------------------------------------------------------------ atomic store


def test_failed_store_keeps_the_previous_image(vmim, rig, tmp_path):
    """An image store that runs out of space: the previous image of that name is intact."""
    populate(vmim, rig)
    store_img = tmp_path / "store.img"
    di.filesystem_image(str(store_img), "ext4", 8, "store")
    with di.attached(str(store_img)) as dev, di.mounted(dev) as small_store:
        cfg = open(rig.cfg).read().replace(f'vmimages = "{rig.images}"',
                                           f'vmimages = "{small_store}"')
        open(rig.cfg, "w").write(cfg)
        with open(os.path.join(small_store, "golden"), "wb") as fh:
            fh.write(b"previous image")
        listing = sorted(os.listdir(small_store))
        with open(os.path.join(rig.mnt("src"), "big"), "wb") as fh:
            fh.write(os.urandom(20 * 1024 * 1024))
        r = vmim("-b", rig.names["src"], "-z", "-s", "golden", "--release", "--config", rig.cfg)
        assert r.code == 6, r
        assert "No space left" in r.err
        assert open(os.path.join(small_store, "golden"), "rb").read() == b"previous image"
        assert sorted(os.listdir(small_store)) == listing  # no debris


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("fmt", ["tgz", "rsync"])
def test_store_killed_mid_way_keeps_the_previous_image_and_debris_goes(vmim, rig, fmt, sig):
    populate(vmim, rig)
    with open(os.path.join(rig.mnt("src"), "big"), "wb") as fh:
        fh.write(os.urandom(64 * 1024 * 1024))
    run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-s", "golden")
    before = sorted(os.listdir(rig.images))
    snap = treecmp.snapshot(str(rig.images / "golden")) if fmt == "rsync" else \
        (rig.images / "golden").read_bytes()
    if fmt == "rsync":  # new data, or the re-store (only differences) ends before the signal
        with open(os.path.join(rig.mnt("src"), "big"), "wb") as fh:
            fh.write(os.urandom(150 * 1024 * 1024))
    proc = subprocess.Popen([sys.executable, "-m", "vmim", "--config", rig.cfg, "-b",
                             rig.names["src"], FORMATS[fmt], "-s", "golden"],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if any(n.startswith(".vmim-tmp.") for n in os.listdir(rig.images)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the store ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait()
    if sig == signal.SIGTERM:  # a caught signal: the store removes its own debris, exit 143
        assert proc.returncode == 143
        assert sorted(os.listdir(rig.images)) == before
    # the next store cleans the debris of the killed one
    run_ok(vmim, rig, "-b", rig.names["src"], FORMATS[fmt], "-s", "other", "--release")
    assert sorted(os.listdir(rig.images)) == sorted(before + ["other"])
    # compared once the debris is gone: a half-made rsync tree shares inodes (link counts)
    after = treecmp.snapshot(str(rig.images / "golden")) if fmt == "rsync" else \
        (rig.images / "golden").read_bytes()
    assert after == snap


def test_list_images_reads_metadata(vmim, rig):
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "--zstd", "-s", "golden", "--release")
    doc = json.loads(run_ok(vmim, rig, "-L", "--json").out)
    (entry,) = doc["images"]
    assert entry["format"] == "tar.zst" and entry["size"] == (rig.images / "golden").stat().st_size
    meta = json.loads((rig.images / ".vmim" / "golden.json").read_text())
    assert meta["source_box"] == rig.names["src"] and len(meta[digest.preferred()]) == 64


def test_a_store_may_change_an_image_between_tree_and_archive(vmim, rig):
    populate(vmim, rig)
    for flag, is_dir in (("--zstd", False), ("-y", True), ("-z", False)):
        run_ok(vmim, rig, "-b", rig.names["src"], flag, "-s", "golden")
        assert (rig.images / "golden").is_dir() is is_dir
    assert sorted(os.listdir(rig.images)) == [".vmim", "golden"]  # nothing set aside remains
    run_ok(vmim, rig, "-b", rig.names["src"], "--release")


def test_an_unexpected_error_in_a_step_still_releases_the_slot(vmim, rig, monkeypatch):
    from vmim import tree

    def broken(*_a, **_k):
        raise PermissionError(13, "Permission denied", "/simulated")
    monkeypatch.setattr(tree, "staging_dir", broken)  # on every clear's way (auto, delete)
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "-z", "-s", "golden", "--release")
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--config", rig.cfg)
    assert r.code == 1, r
    assert "Permission denied (/simulated)" in r.err and "internal error" not in r.err
    assert mounts.mounted_at(rig.mnt("ext4")) is None


def test_a_missing_decompressor_is_found_before_the_slot_is_touched(vmim, rig, tmp_path,
                                                                     monkeypatch):
    populate(vmim, rig)
    run_ok(vmim, rig, "-b", rig.names["src"], "-w", "-s", "golden", "--release")
    # a PATH with every usual program but bzip2 and lbzip2
    farm = tmp_path / "path-without-bzip2"
    farm.mkdir()
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.path.isdir(d):
            for n in os.listdir(d):
                if n not in ("bzip2", "lbzip2") and not (farm / n).exists():
                    (farm / n).symlink_to(os.path.join(d, n))
    monkeypatch.setenv("PATH", str(farm))
    r = vmim("-b", rig.names["ext4"], "-r", "golden", "--config", rig.cfg)
    assert r.code == 7, r
    assert "'lbzip2' was not found" in r.err or "'bzip2' was not found" in r.err
    assert "the slot was not touched" in r.err
    monkeypatch.undo()
    assert _marker(vmim, rig, "ext4") == "ext4 slot\n"


DISK_IMAGE = "qcow2 (--disk-image)"


@pytest.mark.parametrize("fmt", [*FORMATS, DISK_IMAGE])
def test_a_full_image_store_keeps_the_previous_image_leaves_nothing_and_says_so(vmim, rig,
                                                                                  tmp_path, fmt):
    """Finding 10: a store that fills the image store's filesystem, in every format, over an
    image of that name: exit 6 (the writing command failed), the message says the store is
    full, the previous image and its metadata as they were, no temporary entry left."""
    flags = ["--disk-image"] if fmt == DISK_IMAGE else [FORMATS[fmt]]
    box = rig.names["src"]
    store_img = tmp_path / "store.img"
    di.filesystem_image(str(store_img), "ext4", 32, "store")
    with di.attached(str(store_img)) as dev, di.mounted(dev) as small_store:
        os.chmod(small_store, 0o755)
        os.unlink(os.path.join(small_store, "marker"))
        cfg = open(rig.cfg).read().replace(f'vmimages = "{rig.images}"',
                                           f'vmimages = "{small_store}"')
        open(rig.cfg, "w").write(cfg)
        run_ok(vmim, rig, "-b", box, "--mount")
        with open(os.path.join(rig.mnt("src"), "small"), "wb") as fh:
            fh.write(os.urandom(1 << 20))
        run_ok(vmim, rig, "-b", box, *flags, "-s", "golden", "--release")
        golden = os.path.join(small_store, "golden")
        snap = treecmp.snapshot(golden) if fmt == "rsync" else open(golden, "rb").read()
        meta = open(os.path.join(small_store, ".vmim", "golden.json"), "rb").read()
        listing = sorted(os.listdir(small_store))
        run_ok(vmim, rig, "-b", box, "--mount")
        with open(os.path.join(rig.mnt("src"), "big"), "wb") as fh:
            fh.write(os.urandom(48 << 20))  # more than the store's filesystem holds
        r = vmim("-b", box, *flags, "-s", "golden", "--release", "--config", rig.cfg)
        assert sorted(os.listdir(small_store)) == listing  # no temporary entry
        assert os.listdir(os.path.join(small_store, ".vmim")) == ["golden.json"]
        assert open(os.path.join(small_store, ".vmim", "golden.json"), "rb").read() == meta
        after = treecmp.snapshot(golden) if fmt == "rsync" else open(golden, "rb").read()
        assert after == snap
        assert r.code == 6, r
        assert f"image store {small_store} is full" in r.err, r
        assert "Traceback" not in r.err
        assert mounts.mounted_at(rig.mnt("src")) is None  # released after the failure
        # the image is still good: it restores
        restore = ["--disk-image"] if fmt == DISK_IMAGE else []
        run_ok(vmim, rig, "-b", box, *restore, "-r", "golden", "--mount")
        assert os.path.getsize(os.path.join(rig.mnt("src"), "small")) == 1 << 20
        assert not os.path.exists(os.path.join(rig.mnt("src"), "big"))
        run_ok(vmim, rig, "-b", box, "--release")
