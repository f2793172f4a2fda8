"""The sandbox of guest data (issue 20, "Contain every process that reads or writes guest
data") and the lost+found of a plain root-filesystem tar (finding 1).

Each test failed on the main of 2026-12-05: there was no vmim.sandbox; tar, rsync and the newc
extractor ran with the host's whole filesystem in view, so a weakness in one of them (a name
check turned off, a directory symlink followed, a hard link to a device node) wrote host data;
slots were mounted without nodev; and a tar of a root filesystem (./lost+found) wiped the slot.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import stat
import subprocess
import tarfile

import pytest

from tests.archives import newc_of
from tests.integration import treecmp
from tests.integration.test_images import FORMATS, run_ok
from vmim import process, sandbox
from vmim.archive import rsync as rsync_mod
from vmim.archive import tar as tar_mod
from vmim.disk import mounts

# ------------------------------------------------------------------ the sandbox itself


def test_the_sandbox_sees_no_host_path(tmp_path):
    """Only /usr (read-only), its own /dev, /proc and /tmp, and the binds named."""
    mine = tmp_path / "bound"
    mine.mkdir()
    (mine / "file").write_text("seen\n")
    (tmp_path / "beside").write_text("not seen\n")
    script = (
        "for p in /root /work /home /etc/passwd /etc /var /run /tmp/pt-sandbox "
        f"{tmp_path} {tmp_path}/beside; do test -e $p && echo VISIBLE $p; done; "
        "cat /image/file; "
        "touch /usr/vmim-sandbox-probe 2>/dev/null && echo WROTE /usr; "
        "touch /image/new 2>/dev/null && echo WROTE /image; "
        "for d in /dev/*; do test -b $d && echo BLOCK $d; done; "
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1; "
        "ls /proc | grep -c '^[0-9]'"
    )
    r = process.run(sandbox.command(["sh", "-c", script], [sandbox.Bind(str(mine), "/image")],
                                    caps=sandbox.NONE),
                    capture=True)
    lines = r.stdout.split()
    assert "VISIBLE" not in lines, r.stdout
    assert "seen" in lines  # the bind, and only it
    assert "WROTE" not in lines, r.stdout  # /usr and a read-only bind stay unwritten
    assert "BLOCK" not in lines, r.stdout
    assert lines[-2:-1] == ["lo"]  # no network but its own loopback
    assert int(lines[-1]) <= 5  # its own pid namespace: bwrap, sh, ls, grep
    assert not os.path.exists("/usr/vmim-sandbox-probe")
    assert r.argv[0] == "sh"  # messages name the command, not bwrap


def test_a_command_that_fails_in_the_sandbox_is_named_as_itself(tmp_path):
    with pytest.raises(Exception) as info:
        process.pipeline([sandbox.command(["tar", "--extract", "--file=-"], [],
                                          caps=sandbox.UNPACK_XATTRS), ["true"]],
                         stdin_path="/dev/null")
    assert "tar --extract" in str(info.value) and "bwrap" not in str(info.value)


def test_a_missing_bubblewrap_is_exit_7(monkeypatch):
    from vmim.errors import EXIT_ENVIRONMENT, ToolMissingError

    monkeypatch.setattr(sandbox, "BWRAP", "bwrap-not-installed-here")
    with pytest.raises(ToolMissingError) as info:
        sandbox.command(["tar", "--version"], [], caps=sandbox.NONE)
    assert info.value.exit_code == EXIT_ENVIRONMENT and "install bubblewrap" in str(info.value)


def test_an_unpacker_that_follows_symlinks_cannot_reach_the_host(tmp_path):
    """GNU cpio follows a symlink an earlier member made (test_hostile.py shows it escaping);
    in the sandbox the host directory it names is not there."""
    host = tmp_path / "host"
    host.mkdir()
    guest = tmp_path / "guest"
    guest.mkdir()
    data = newc_of([(1, stat.S_IFLNK | 0o777, 1, b"escape", str(host).encode()),
                    (2, stat.S_IFREG | 0o644, 1, b"escape/planted", b"pwned\n")])
    archive = tmp_path / "a.cpio"
    archive.write_bytes(data)
    with contextlib.suppress(Exception):
        process.pipeline([sandbox.command(["cpio", "-i", "-d", "--quiet"],
                                          [sandbox.Bind(str(guest), "/slot", writable=True)],
                                          caps=sandbox.UNPACK, cwd="/slot")], stdin_path=str(archive))
    assert list(host.iterdir()) == []
    assert os.readlink(guest / "escape") == str(host)


# ------------------------------------------------------------------ least privilege inside


def _inside(code, caps, binds=()):
    """Run python3 -c code in the sandbox keeping caps; its stdout, split in words."""
    r = process.run(sandbox.command(["python3", "-c", code], list(binds), caps=caps),
                    capture=True)
    return r.stdout.split()


#: prints, for each attempt, NAME=OK or NAME=<errno name>
_ATTEMPTS = """
import ctypes, errno, os, sys
def attempt(name, fn):
    try:
        fn()
        print(name + "=OK")
    except OSError as exc:
        print(name + "=" + errno.errorcode[exc.errno])
"""


@pytest.mark.parametrize("caps,may", [("NONE", False), ("READ", False), ("READ_XATTRS", False),
                                      ("DELETE", False), ("UNPACK", True)])
def test_a_sandbox_without_unpack_capabilities_cannot_make_nodes_or_give_files_away(
        tmp_path, caps, may):
    """A store, a proof, a removal keep no CAP_MKNOD and no CAP_CHOWN: even a compromised tar
    there cannot make a device node or hand a file to another owner."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "file").write_text("x\n")
    code = _ATTEMPTS + """
attempt("mknod", lambda: os.mknod("/dest/node", 0o600 | 0o020000, os.makedev(1, 3)))
attempt("chown", lambda: os.chown("/dest/file", 1234, 1234))
"""
    got = _inside(code, sandbox.SETS[caps], [sandbox.Bind(str(dest), sandbox.DEST, True)])
    if may:
        assert got == ["mknod=OK", "chown=OK"]
        assert (dest / "file").stat().st_uid == 1234
    else:
        assert got == ["mknod=EPERM", "chown=EPERM"]
        assert not (dest / "node").exists() and (dest / "file").stat().st_uid == 0


def test_a_reading_sandbox_reads_every_file_and_writes_none(tmp_path):
    """READ (a store's tar, find, cpio) reads a file of mode 000, which NONE cannot, and
    cannot write into a directory it does not own."""
    tree = tmp_path / "tree"
    tree.mkdir()
    secret = tree / "shadow"
    secret.write_text("guest secret\n")
    secret.chmod(0)
    os.chown(tree, 1234, 1234)
    tree.chmod(0o755)
    code = _ATTEMPTS + """
attempt("read", lambda: open("/slot/shadow").read())
attempt("write", lambda: open("/slot/new", "w").close())
"""
    binds = [sandbox.Bind(str(tree), sandbox.SLOT, True)]
    assert _inside(code, sandbox.NONE, binds) == ["read=EACCES", "write=EACCES"]
    assert _inside(code, sandbox.READ, binds) == ["read=OK", "write=EACCES"]
    assert not (tree / "new").exists()


def _hard_tree(root):
    """treecmp's tree (owners, setuid, sticky, device nodes, file capabilities, ACLs, xattrs)
    and what only the capabilities of the sets read or write: a trusted.* xattr (CAP_SYS_ADMIN),
    a setgid file of another group (CAP_FSETID) and a mode-000 file of another user in a
    mode-000 directory of another user. (Unpacking it with UNPACK_XATTRS less any one of its
    capabilities but CAP_SYS_RESOURCE loses something: tar fails, or silently drops the setgid
    bit, the file capability or the trusted.* xattr.)"""
    treecmp.build(root)
    os.setxattr(os.path.join(root, "etc", "hostname"), "trusted.vmim-test", b"kept")
    sgid = os.path.join(root, "usr", "bin", "wall")  # setgid, of a group root is not in:
    with open(sgid, "w") as fh:  # without CAP_FSETID the chmod after the chown drops the bit
        fh.write("#!/bin/sh\n")
    os.chown(sgid, 0, 1234)
    os.chmod(sgid, 0o2755)
    # times in the past, as treecmp gives everything: rsync -H does not mend the time of a
    # directory whose hard links it made late when that time is within the current second
    for path in (sgid, os.path.dirname(sgid)):
        os.utime(path, ns=(treecmp.MTIME, treecmp.MTIME))
    locked = os.path.join(root, "locked")
    os.mkdir(locked)
    with open(os.path.join(locked, "shadow"), "w") as fh:
        fh.write("guest secret\n")
    os.chmod(os.path.join(locked, "shadow"), 0)
    os.chown(os.path.join(locked, "shadow"), 1234, 1234)
    os.chown(locked, 1234, 1234)
    os.utime(locked, ns=(treecmp.MTIME, treecmp.MTIME))
    os.chmod(locked, 0)
    return treecmp.snapshot(root)


@pytest.mark.parametrize("fmt", ["tar", "rsync"])
def test_the_least_sets_still_store_and_unpack_a_whole_filesystem(tmp_path, fmt):
    """READ_XATTRS (tar store), COPY (rsync) and UNPACK_XATTRS (tar unpack) are enough for
    what a root filesystem holds; a smaller set for the store loses the trusted.* xattr (READ)
    or fails (NONE), which is why the sets are what they are."""
    from vmim.archive.rsync import RsyncFormat
    from vmim.archive.tar import TarFormat

    src, staging = tmp_path / "src", tmp_path / "staging"
    src.mkdir()
    staging.mkdir()
    before = _hard_tree(str(src))
    tool = TarFormat(None, "tar") if fmt == "tar" else RsyncFormat()
    image = str(tmp_path / ("image.tar" if fmt == "tar" else "image"))
    tool.write(str(src), ["."], image)
    tool.unpack(image, str(staging))
    after = treecmp.snapshot(str(staging))
    assert treecmp.differences(before, after) == []
    assert after[b"etc/hostname"]["xattrs"]["trusted.vmim-test"] == b"kept"
    assert after[b"locked/shadow"]["sha256"] == before[b"locked/shadow"]["sha256"]


def test_a_tar_store_with_less_than_read_xattrs_loses_data_or_fails(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _hard_tree(str(src))

    def store(caps):
        argv = ["tar", "--create", "--file=-", f"--directory={sandbox.SLOT}", *tar_mod.CREATE,
                "--", "."]
        out = tmp_path / "out.tar"
        process.pipeline([sandbox.command(argv, [sandbox.Bind(str(src), sandbox.SLOT)],
                                          caps=caps)], stdout_path=str(out))
        return out.read_bytes()

    assert b"trusted.vmim-test" in store(sandbox.READ_XATTRS)
    assert b"trusted.vmim-test" not in store(sandbox.READ)  # tar says nothing: data lost
    with pytest.raises(process.CommandError):
        store(sandbox.NONE)  # the mode-000 directory


def _merge_guest(base):
    """A guest whose /etc (another user's, mode 0555) and sticky /tmp (another user's, holding
    a third user's file) the merge writes into, and a staging directory whose metadata (the
    archive's ".": another owner, setgid, a trusted.* xattr) goes to the guest root."""
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "old").write_text("")
    os.chown(root / "etc", 1234, 1234)
    (root / "etc").chmod(0o555)
    (root / "tmp").mkdir()
    (root / "tmp" / "x").write_text("")
    os.chown(root / "tmp" / "x", 1235, 1235)
    os.chown(root / "tmp", 1234, 1234)
    (root / "tmp").chmod(0o1777)
    staging = root / ".stage"
    for d in ("etc", "tmp", "opt/d"):
        (staging / d).mkdir(parents=True)
    (staging / "etc" / "new").write_text("")
    (staging / "tmp" / "x").write_text("new\n")
    os.chown(staging, 1234, 1234)
    staging.chmod(0o2750)
    os.setxattr(staging, "trusted.vmim-test", b"kept")
    return root


@pytest.mark.parametrize("drop", [None, "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER",
                                  "CAP_FSETID", "CAP_SYS_ADMIN"])
def test_the_merge_needs_every_capability_of_merge(tmp_path, drop):
    """With MERGE the staging directory goes into the guest whole and the root takes its
    owner, setgid mode and trusted.* xattr; with any one capability less the merge fails or
    silently loses one of them."""
    from vmim import tree
    from vmim.errors import VmimError

    root = _merge_guest(tmp_path)
    caps = sandbox.MERGE - {drop}
    failed = False
    try:
        tree.merge_contained(str(root / ".stage"), str(root), remove_staging=True) \
            if drop is None else _merge_with(root, caps)
    except (OSError, VmimError):
        failed = True
    st = os.stat(root)
    whole = (not failed and sorted(os.listdir(root / "etc")) == ["new", "old"]
             and (root / "tmp" / "x").read_text() == "new\n" and not (root / ".stage").exists()
             and (st.st_uid, st.st_gid) == (1234, 1234) and st.st_mode & 0o7777 == 0o2750
             and "trusted.vmim-test" in os.listxattr(root))
    assert whole is (drop is None)


def _merge_with(root, caps):
    from vmim import guestwork

    guestwork.call("merge", {"staging": f"{sandbox.SLOT}/.stage", "root": sandbox.SLOT,
                             "dest": "/", "remove_staging": True},
                   [sandbox.Bind(str(root), sandbox.SLOT, writable=True)], caps=caps)


def _number(name):
    from vmim import seccomp

    sc = seccomp.binding()
    return sc.resolve_syscall(sc.Arch.NATIVE, name)


def test_the_seccomp_filter_denies_mounts_namespaces_and_keyrings_even_with_cap_sys_admin(
        tmp_path):
    """UNPACK_XATTRS keeps CAP_SYS_ADMIN (trusted.* xattrs): without the filter the program
    could mount, unshare, setns and use keyrings with it. With it, each is refused."""
    nr = {n: _number(n) for n in ("keyctl", "add_key", "io_uring_setup", "fsopen", "setns",
                                  "open_by_handle_at", "bpf")}
    code = _ATTEMPTS + f"""
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    def go():
        if fn(*args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return go
nr = {nr!r}
attempt("mount", call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None))
attempt("unshare", call(libc.unshare, 0x00020000))
attempt("setns", call(libc.syscall, nr["setns"], 0, 0))
attempt("keyctl", call(libc.syscall, nr["keyctl"], 0, -3, 0))
attempt("add_key", call(libc.syscall, nr["add_key"], b"user", b"k", b"v", 1, -3))
attempt("bpf", call(libc.syscall, nr["bpf"], 0, 0, 0))
attempt("open_by_handle_at", call(libc.syscall, nr["open_by_handle_at"], 0, 0, 0))
attempt("io_uring_setup", call(libc.syscall, nr["io_uring_setup"], 1, 0))
attempt("fsopen", call(libc.syscall, nr["fsopen"], b"tmpfs", 0))
import fcntl, termios
# a terminal of the sandbox's own /dev/pts: made without the filter (its ioctls are refused)
attempt("openpty", os.openpty)
null = os.open("/dev/null", os.O_RDONLY)  # without the filter: ENOTTY
attempt("TIOCSTI", lambda: fcntl.ioctl(null, termios.TIOCSTI, b"x"))
attempt("chown", lambda: os.chown("/tmp", 0, 0))
"""
    got = _inside(code, sandbox.UNPACK_XATTRS)
    assert got == ["mount=EPERM", "unshare=EPERM", "setns=EPERM", "keyctl=EPERM",
                   "add_key=EPERM", "bpf=EPERM", "open_by_handle_at=EPERM",
                   "io_uring_setup=ENOSYS", "fsopen=ENOSYS", "openpty=EPERM", "TIOCSTI=EPERM",
                   "chown=OK"]


def test_util_linux_unshare_fails_in_the_sandbox_and_an_unpack_still_works(tmp_path):
    with pytest.raises(process.CommandError) as info:
        process.run(sandbox.command(["unshare", "-r", "true"], [], caps=sandbox.UNPACK_XATTRS))
    assert "Operation not permitted" in str(info.value)
    archive = tmp_path / "a.tar"
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    os.chown(src / "etc" / "motd", 1234, 1234)
    subprocess.run(["tar", "-C", str(src), "-cf", str(archive), "."], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    process.pipeline([sandbox.command(
        ["tar", "--extract", "--file=-", f"--directory={sandbox.DEST}", *tar_mod.EXTRACT],
        [sandbox.Bind(str(dest), sandbox.DEST, True)], caps=sandbox.UNPACK_XATTRS)],
        stdin_path=str(archive))
    assert (dest / "etc" / "motd").read_text() == "hello\n"
    assert (dest / "etc" / "motd").stat().st_uid == 1234


# ------------------------------------------------------------------ through the command line


def _rig_guest(vmim, rig, key="ext4"):
    run_ok(vmim, rig, "-b", rig.names[key], "--mount")
    return rig.mnt(key)


def test_tar_without_its_own_name_checks_still_cannot_write_a_host_file(vmim, rig, tmp_path,
                                                                       monkeypatch):
    """Defend the class: even with GNU tar's refusal of absolute names turned off, an insert
    holding a host path writes nothing there."""
    monkeypatch.setattr(tar_mod, "EXTRACT", [*tar_mod.EXTRACT, "--absolute-names"])
    host_file = tmp_path / "host-file"
    host_file.write_text("host data\n")
    with tarfile.open(rig.inserts / "abs", "w:gz") as t:
        info = tarfile.TarInfo(str(host_file))
        info.size = 6
        t.addfile(info, io.BytesIO(b"pwned\n"))
    r = vmim("-b", rig.names["ext4"], "-i", "abs", "--config", rig.cfg)
    assert r.code in (0, 1, 6), r
    assert host_file.read_text() == "host data\n"


@pytest.mark.parametrize("fmt", ["rsync", "tgz"])
def test_a_store_that_follows_guest_symlinks_still_cannot_read_a_host_file(vmim, rig, tmp_path,
                                                                          monkeypatch, fmt):
    """rsync told to copy the referent of symlinks that leave the tree, tar told to dereference
    symlinks: a guest symlink to a host file would put the host file's content in the image.
    In the sandbox the host file is not there."""
    if fmt == "rsync":
        monkeypatch.setattr(rsync_mod, "FLAGS", [*rsync_mod.FLAGS, "--copy-unsafe-links"])
    else:
        monkeypatch.setattr(tar_mod, "CREATE", [*tar_mod.CREATE, "--dereference"])
    secret = tmp_path / "host-secret"
    secret.write_text("host secret\n")
    guest = _rig_guest(vmim, rig)
    os.symlink(str(secret), os.path.join(guest, "leak"))
    vmim("-b", rig.names["ext4"], FORMATS[fmt], "-s", "leaked", "--release", "--config", rig.cfg)
    assert [p for p in rig.images.rglob("*") if _holds(p, b"host secret")] == []


def _holds(path, text: bytes) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return text in data


def test_an_insert_that_merges_through_a_guest_symlink_to_a_host_directory(vmim, rig, tmp_path):
    """The guest's /conf is a symlink to a host directory (which the guest does not hold): the
    insert's conf/ lands in the guest, the host directory stays as it was."""
    host_etc = tmp_path / "host-etc"
    host_etc.mkdir()
    (host_etc / "passwd").write_text("host\n")
    guest = _rig_guest(vmim, rig)
    os.symlink(str(host_etc), os.path.join(guest, "conf"))
    with tarfile.open(rig.inserts / "etc", "w:gz") as t:
        for name in ("conf/passwd", "conf/new"):
            info = tarfile.TarInfo(name)
            info.size = 6
            t.addfile(info, io.BytesIO(b"guest\n"))
    r = vmim("-b", rig.names["ext4"], "-i", "etc", "--config", rig.cfg)
    assert r.code == 1 and "does not exist" in r.err, r  # the guest has no such directory
    assert sorted(os.listdir(host_etc)) == ["passwd"]
    assert (host_etc / "passwd").read_text() == "host\n"
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    os.makedirs(guest + str(host_etc))  # now it has
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-i", "etc")
    assert sorted(os.listdir(host_etc)) == ["passwd"]
    assert (host_etc / "passwd").read_text() == "host\n"
    assert open(guest + str(host_etc) + "/new").read() == "guest\n"  # inside the guest
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


# ------------------------------------------------------------------ device nodes: nodev


@contextlib.contextmanager
def _host_loop(tmp_path):
    """A loop device of this test's own, on a small file of its own."""
    backing = tmp_path / "loop-backing"
    backing.write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_a_restored_device_node_of_a_host_disk_cannot_be_opened(vmim, rig, tmp_path):
    with _host_loop(tmp_path) as (dev, backing):
        rdev = os.stat(dev).st_rdev
        with tarfile.open(rig.images / "withdev", "w:gz") as t:
            info = tarfile.TarInfo("dev/hostdisk")
            info.type = tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(rdev), os.minor(rdev)
            info.mode = 0o666
            t.addfile(info)
            info = tarfile.TarInfo("etc/hostname")
            info.size = 6
            t.addfile(info, io.BytesIO(b"guest\n"))
        run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "withdev", "--mount")
        node = os.path.join(rig.mnt("ext4"), "dev", "hostdisk")
        try:
            st = os.lstat(node)
            assert stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev  # restored as it was
            for flags in (os.O_RDONLY, os.O_WRONLY):
                with pytest.raises(PermissionError) as info:
                    os.close(os.open(node, flags))
                assert info.value.errno == errno.EACCES
            options = next(m.options for m in mounts.all_mounts()
                           if m.target == rig.mnt("ext4"))
            assert "nodev" in options and "nosuid" in options
        finally:
            run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
        assert backing.read_bytes() == b"\0" * (1 << 20)


def test_a_cpio_insert_cannot_write_to_a_host_block_device(vmim, rig, tmp_path):
    """Finding 3: a hard-link group whose name is replaced by a block device node made the
    newc extractor open the node for writing (data reached a host loop device)."""
    with _host_loop(tmp_path) as (dev, backing):
        rdev = os.stat(dev).st_rdev
        entries = newc_of([(7, stat.S_IFREG | 0o644, 2, b"a", b""),
                           (7, stat.S_IFBLK | 0o600, 2, b"a", b""),
                           (7, stat.S_IFREG | 0o644, 2, b"b", b"PWNED" * 100)])
        # rdev of the device entry (newc_of writes zeros): fields 9 and 10 of its header
        second = 112  # the first entry: a 110-byte header, "a\0", no data
        assert entries[second:second + 6] == b"070701"
        hexdev = b"%08X%08X" % (os.major(rdev), os.minor(rdev))
        at = second + 6 + 8 * 9
        entries = entries[:at] + hexdev + entries[at + 16:]
        (rig.inserts / "devlink").write_bytes(entries)
        r = vmim("-b", rig.names["ext4"], "-i", "devlink", "--config", rig.cfg)
        assert r.code in (0, 1, 4), r  # refused (by the proof: 4), or made without opening it
        assert "Traceback" not in r.err
        assert backing.read_bytes() == b"\0" * (1 << 20)


# ------------------------------------------------------------------ finding 1: lost+found


def _plain_archive(fmt, mnt, dest):
    """What a sysadmin makes of a mounted root filesystem with the plain tools."""
    if fmt == "rsync":
        subprocess.run(["cp", "-a", f"{mnt}/.", str(dest)], check=True)
    elif fmt == "cpio.bz2":
        names = subprocess.run(["find", "."], cwd=mnt, capture_output=True, check=True).stdout
        data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=mnt, input=names,
                              capture_output=True, check=True).stdout
        dest.write_bytes(subprocess.run(["bzip2", "-c"], input=data, capture_output=True,
                                        check=True).stdout)
    else:
        z = "--zstd" if fmt == "tar.zst" else "--gzip"
        subprocess.run(["tar", "-C", mnt, z, "-cf", str(dest), "."], check=True)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_plain_tar_of_a_root_filesystem_restores_keeping_the_slots_lost_found(
        vmim, rig, tmp_path, fmt):
    src = _rig_guest(vmim, rig, "src")
    os.makedirs(os.path.join(src, "etc"), exist_ok=True)
    with open(os.path.join(src, "etc", "hostname"), "w") as fh:
        fh.write("from plain tools\n")
    with open(os.path.join(src, "lost+found", "#1234"), "w") as fh:
        fh.write("what fsck found in the source\n")
    _plain_archive(fmt, src, rig.images / "plain")
    run_ok(vmim, rig, "-b", rig.names["src"], "--release")

    guest = _rig_guest(vmim, rig)
    before = os.lstat(os.path.join(guest, "lost+found")).st_ino
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-r", "plain", "--mount")
    try:
        lf = os.path.join(guest, "lost+found")
        assert os.lstat(lf).st_ino == before  # the filesystem's own
        assert os.listdir(lf) == []  # not the source's content
        assert open(os.path.join(guest, "etc", "hostname")).read() == "from plain tools\n"
        assert not [n for n in os.listdir(guest) if n.startswith(".vmim-")]
    finally:
        run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
    fsck = subprocess.run(["e2fsck", "-fn", rig.disk("ext4")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# ------------------------------------------------------------------ typed errors come back


def test_the_newc_extractors_errors_come_back_from_the_sandbox_as_themselves(tmp_path):
    from vmim.archive import CorruptArchive, UnsafeMember
    from vmim.archive.cpio import CpioFormat

    fmt = CpioFormat(None, "cpio")
    cases = {
        "unsafe": (newc_of([(1, stat.S_IFREG | 0o644, 1, b"../x", b"x")]), UnsafeMember,
                   "cpio member b'../x' is absolute or contains '..'"),
        "cut": (newc_of([(1, stat.S_IFREG | 0o644, 1, b"f", b"x" * 100)])[:150], CorruptArchive,
                "cpio archive ends early"),
    }
    for name, (data, cls, words) in cases.items():
        image = tmp_path / name
        image.write_bytes(data)
        staging = tmp_path / f"staging-{name}"
        staging.mkdir()
        with pytest.raises(cls) as info:
            fmt.unpack(str(image), str(staging))
        assert type(info.value) is cls and words in str(info.value)
        assert info.value.exit_code == 1


def test_a_merge_error_in_the_sandbox_is_the_same_message(tmp_path):
    from vmim import tree, worklog
    from vmim.errors import OperationError

    guest = tmp_path / "guest"
    (guest / "x").mkdir(parents=True)
    (guest / "x" / "sub").mkdir()
    records = worklog.WorkLog(str(tmp_path / "state"), "sandbox", str(guest))
    staging = tree.staging_dir(str(guest), "insert", like=str(guest), records=records)
    with open(os.path.join(staging, "x"), "w") as fh:
        fh.write("a file over a directory\n")
    with pytest.raises(OperationError) as info:
        tree.merge_contained(staging, str(guest))
    assert str(info.value) == "cannot put a file at /x in the guest: a directory is there"


#: inside the sandbox: watch every open on the filesystem of /usr (the host's root filesystem
#: here) with fanotify, and write into the file of inode INO when the host opens it
_FANOTIFY = """
import ctypes, os, select, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
FAN_CLASS_NOTIF, FAN_MARK_ADD, FAN_MARK_FILESYSTEM, FAN_OPEN = 0, 1, 0x100, 0x20
fan = libc.fanotify_init(FAN_CLASS_NOTIF, os.O_RDWR | os.O_LARGEFILE)
if fan < 0:
    print("fanotify_init=" + __import__("errno").errorcode[ctypes.get_errno()])
    sys.exit(0)
if libc.fanotify_mark(fan, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, ctypes.c_uint64(FAN_OPEN),
                      -100, b"/usr") < 0:
    print("fanotify_mark=" + __import__("errno").errorcode[ctypes.get_errno()])
    sys.exit(0)
print("watching", flush=True)
end = time.time() + 20
while time.time() < end:
    if not select.select([fan], [], [], 0.5)[0]:
        continue
    buf = os.read(fan, 65536)
    while len(buf) >= 24:
        size, _v, _r, _m, _mask, fd, _pid = struct.unpack("=IBBHQii", buf[:24])
        buf = buf[size:]
        if fd < 0:
            continue
        if os.fstat(fd).st_ino == INO:
            os.pwrite(fd, b"written from the sandbox\\n", 0)
            print("wrote a host file")
            sys.exit(0)
        os.close(fd)
print("no event")
"""


@pytest.mark.parametrize("caps", ["UNPACK_XATTRS", "COPY", "MERGE", "READ_XATTRS"])
def test_fanotify_cannot_hand_the_sandbox_a_host_file(tmp_path, caps):
    """CAP_SYS_ADMIN (kept for trusted.* xattrs) lets fanotify_init() watch a whole filesystem,
    past every bind: each event carries a descriptor of the file the host opened, opened for
    the sandbox with its O_RDWR and its CAP_DAC_OVERRIDE. A compromised tar could then write
    whatever file of the host's filesystem the host opens. The filter refuses fanotify."""
    import threading

    host_file = tmp_path / "host-file"
    host_file.write_text("the host's\n")
    if os.stat(host_file).st_dev != os.stat("/usr").st_dev:
        pytest.skip("the test's directory is not on the filesystem of /usr")
    code = _FANOTIFY.replace("INO", str(os.stat(host_file).st_ino))
    stop = threading.Event()

    def host_opens():  # the host goes on opening its file, as root's programs do
        while not stop.wait(0.2):
            with open(host_file, "rb") as fh:
                fh.read()

    t = threading.Thread(target=host_opens, daemon=True)
    t.start()
    try:
        got = _inside(code, sandbox.SETS[caps])
    finally:
        stop.set()
        t.join()
    assert host_file.read_text() == "the host's\n", got
    assert got == ["fanotify_init=EPERM"]


_REOPEN = """
import os
try:
    fd = os.open("/proc/self/fd/0", os.O_RDWR)
    os.pwrite(fd, b"rewritten from the sandbox", 0)
    print("rewrote")
except OSError as exc:
    print("refused", exc.errno)
data = os.read(0, 1 << 20)
"""


@pytest.mark.parametrize("caps", ["NONE", "UNPACK_XATTRS"])
@pytest.mark.parametrize("how", ["pipeline", "fan_out"])
def test_a_sandboxed_reader_of_an_image_cannot_rewrite_it(tmp_path, caps, how):
    """An uncompressed image was given to tar (the unpack, and the proof with no capability at
    all) as its stdin, a descriptor of the store's file: /proc/self/fd/0 opened it again for
    writing (root owns the image), past the read-only binds. A sandboxed command now reads an
    image through a pipe, and popen() refuses to hand one a named host file."""
    image = tmp_path / "image.tar"
    image.write_bytes(b"the store's image\n")
    image.chmod(0o644)
    argv = sandbox.command(["python3", "-c", _REOPEN], [], caps=sandbox.SETS[caps])
    if how == "pipeline":
        process.pipeline([argv], stdin_path=str(image))
    else:
        process.fan_out(str(image), None, [process.Sink(argv, reader=lambda out: out.read())])
    assert image.read_bytes() == b"the store's image\n"
    with open(image, "rb") as fh, pytest.raises(ValueError, match="host file as its stdin"):
        process.popen(argv, stdin=fh)


@pytest.mark.parametrize("caps", ["UNPACK_XATTRS", "COPY", "MERGE"])
def test_the_sandboxs_proc_is_read_only(caps):
    """bwrap covers /proc/sys, /proc/sysrq-trigger, /proc/irq and /proc/bus, not the rest:
    with CAP_SYS_ADMIN a compromised tar could write /proc/mtrr (the host CPU's memory
    caching: a hypervisor slowed to a crawl or hung). The sandbox's /proc is mounted read-only
    (nothing in it needs to write there); nothing is written here, the opening is refused."""
    code = _ATTEMPTS + """
for path in ("/proc/mtrr", "/proc/self/oom_score_adj", "/proc/pressure/io"):
    if os.path.exists(path):
        attempt(path, lambda: os.close(os.open(path, os.O_WRONLY)))
attempt("read", lambda: open("/proc/self/status").read())
"""
    got = _inside(code, sandbox.SETS[caps])
    assert got[-1] == "read=OK"
    assert [g for g in got[:-1] if not g.endswith("=EROFS")] == [], got


def test_the_sandbox_makes_no_socket_but_af_unix():
    """The network namespace does not cover AF_VSOCK: from the sandbox a compromised tar could
    connect to the host's virtual machines (a guest agent or sshd listening on vsock). Only
    AF_UNIX sockets are made (rsync's socketpair)."""
    code = _ATTEMPTS + """
import socket
attempt("vsock", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close())
attempt("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
attempt("socketpair", lambda: [s.close() for s in socket.socketpair()])
"""
    got = _inside(code, sandbox.UNPACK_XATTRS)
    assert got == ["vsock=EAFNOSUPPORT", "inet=EAFNOSUPPORT", "netlink=EAFNOSUPPORT",
                   "unix=OK", "socketpair=OK"]


def test_a_tree_image_puts_no_guest_setuid_program_or_node_within_other_users_reach(
        vmim, rig):
    """A guest plants a setuid-root program and a block node of mode 0666 (here of loop0); a
    store with -y puts both on the host's image store (not nosuid, not nodev), where every user
    may search by default: any local user ran the guest's program as root, or opened the
    node (checked with access() as user nobody: nothing is run or opened). The tree's top
    directory is now closed to others, and its mode (the guest root's) comes back on restore."""
    guest = _rig_guest(vmim, rig)
    program = os.path.join(guest, "rootshell")
    with open(program, "w") as fh:
        fh.write("#!/bin/sh\nid\n")
    os.chown(program, 0, 0)
    os.chmod(program, 0o4755)
    os.mknod(os.path.join(guest, "disk"), 0o666 | stat.S_IFBLK, os.makedev(7, 0))
    run_ok(vmim, rig, "-b", rig.names["ext4"], "-y", "-s", "tree", "--release")
    tree = rig.images / "tree"
    assert (tree / "rootshell").stat().st_mode & 0o4000  # kept, as the format promises

    def nobody(*test):
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "--", "test", *test], check=False).returncode == 0

    assert not nobody("-u", str(tree / "rootshell")), "a guest's setuid-root program"
    assert not nobody("-w", str(tree / "disk")), "a guest's device node, writable"
    guest_mode = os.stat(guest).st_mode & 0o7777
    run_ok(vmim, rig, "-b", rig.names["xfs"], "-r", "tree", "--mount")
    try:
        assert os.stat(rig.mnt("xfs")).st_mode & 0o7777 == guest_mode
        assert not os.listxattr(rig.mnt("xfs"))  # the mode's xattr is the host's, not carried
    finally:
        run_ok(vmim, rig, "-b", rig.names["xfs"], "--release")


def test_a_mounted_slot_is_out_of_other_users_reach(vmim, rig):
    """A slot mounted (by --mount, or while a restore or store runs) showed the guest's files to
    every local user: the mount base the tool makes was mode 0755, the guest's root is 0755, and
    a guest's file owned by uid N is the host's uid N's to read and write — tampering with a
    golden image while it is stored. The mount base the tool makes is root's only (0700)."""
    guest = _rig_guest(vmim, rig)
    private = os.path.join(guest, "private")
    try:
        with open(private, "w") as fh:
            fh.write("the guest's\n")
        os.chown(private, 65534, 65534)
        os.chmod(private, 0o600)
        reached = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                  "--", "test", "-w", private], check=False).returncode == 0
    finally:
        run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")
    assert not reached, "user nobody may write a file of the mounted guest"
