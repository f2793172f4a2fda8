"""The newc extractor on damaged and hostile streams (members are made by GNU cpio)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests.archives import newc_of
from vmim.archive import newc

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("cpio") is None,
                                reason="extracting keeps owners and makes device nodes: needs "
                                       "root and GNU cpio")


def cpio_of(root, names):
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                          input="\n".join(names).encode() + b"\n", capture_output=True,
                          check=True).stdout


@pytest.fixture
def stream(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content\n" * 1000)
    os.link(src / "d" / "f", src / "d" / "g")
    os.symlink("/etc/absolute", src / "d" / "abs")
    return cpio_of(src, ["d", "d/f", "d/g", "d/abs"])


def test_extracts_files_links_and_symlinks(tmp_path, stream):
    out = tmp_path / "out"
    out.mkdir()
    assert newc.extract(io.BytesIO(stream), str(out)) == 4
    assert (out / "d" / "f").read_bytes() == b"content\n" * 1000
    assert os.stat(out / "d" / "f").st_ino == os.stat(out / "d" / "g").st_ino
    assert os.readlink(out / "d" / "abs") == "/etc/absolute"


def test_a_truncated_stream_is_an_error(tmp_path, stream):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(newc.CorruptArchive, match="ends"):
        newc.extract(io.BytesIO(stream[: len(stream) // 2]), str(out))


def test_a_stream_that_is_not_newc_is_an_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(newc.CorruptArchive, match="not a cpio newc archive"):
        newc.extract(io.BytesIO(b"x" * 200), str(out))


def test_a_header_naming_a_huge_name_is_corrupt_before_it_is_read():
    """namesize 0xFFFFFFFF: the proof, in the tool's own process, asked for 4 GiB at once."""
    header = b"070701" + b"".join(b"%08X" % f for f in [1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0,
                                                         0xFFFFFFFF, 0])
    asked = []

    class Stream(io.BytesIO):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    with pytest.raises(newc.CorruptArchive, match="4294967295 bytes"):
        newc.check(Stream(header + b"x" * 64))
    assert max(asked) <= newc.HEADER


def test_dotdot_and_absolute_members_are_refused(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (tmp_path / "escape").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a/../../escape", str(tmp_path / "escape")):
        data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=src,
                              input=name.encode() + b"\n", capture_output=True).stdout
        with pytest.raises(newc.UnsafeMember):
            newc.extract(io.BytesIO(data), str(out))
    assert os.listdir(out) == []


# ------------------------------------------------------------------ hard link groups (issue 20, 3)

BLK, CHR, FIFO = stat.S_IFBLK | 0o600, stat.S_IFCHR | 0o600, stat.S_IFIFO | 0o600
REG, LNK = stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777


@pytest.fixture
def loop(tmp_path):
    """A loop device of this test's own over a small file: (its (major, minor), the file)."""
    backing = tmp_path / "backing"
    backing.write_bytes(b"B" * 65536)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        st = os.stat(dev)
        yield (os.major(st.st_rdev), os.minor(st.st_rdev)), backing
    finally:
        # only ours, and only while it is still ours (losetup -j: what is over our file)
        attached = subprocess.run(["losetup", "-j", str(backing), "-O", "NAME", "-n"],
                                  capture_output=True, text=True).stdout.split()
        if dev in attached:
            subprocess.run(["losetup", "-d", dev], check=True)


def _extract_in_child(data: bytes, out) -> subprocess.CompletedProcess:
    """newc.extract in a child process with a timeout: a hang is a failure, not a stuck run."""
    image = out.parent / "insert.cpio"
    image.write_bytes(data)
    code = ("import sys; from vmim.archive import newc\n"
            "with open(sys.argv[1], 'rb') as fh:\n"
            "    try:\n"
            "        newc.extract(fh, sys.argv[2])\n"
            "    except newc.OperationError as exc:\n"
            "        print(type(exc).__name__, exc, file=sys.stderr); sys.exit(3)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, str(image), str(out)],
                              capture_output=True, text=True, timeout=20,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    except subprocess.TimeoutExpired:
        pytest.fail("the extractor hangs")


def _proof(data: bytes):
    try:
        return newc.check(io.BytesIO(data))
    except newc.OperationError as exc:
        return exc


@pytest.mark.parametrize("kind", ["block device", "FIFO"])
def test_a_group_name_replaced_by_a_node_is_never_opened(tmp_path, loop, kind):
    """The attack: x is the first of a group, a device node (or FIFO) takes its name, and the
    group's data member follows: the data went through x into the host's loop device."""
    rdev, backing = loop
    node = (8, BLK, 1, b"x", b"", rdev) if kind == "block device" else (8, FIFO, 1, b"x", b"")
    data = newc_of([(7, REG, 2, b"x", b""), node, (7, REG, 2, b"y", b"PWNED" * 100)])
    out = tmp_path / "out"
    out.mkdir()
    done = _extract_in_child(data, out)
    assert done.returncode == 3 and "replaced" in done.stderr  # a clean error, no hang
    assert backing.read_bytes() == b"B" * 65536
    assert isinstance(_proof(data), newc.UnsafeMember)  # and the proof says so up front


@pytest.mark.parametrize("kind", ["block device", "char device", "FIFO"])
def test_a_group_whose_first_member_is_not_a_file_is_linked_never_opened(tmp_path, loop, kind):
    """As GNU cpio: later members of the group are links to its first, whatever their own
    type; the data a later member carries is not written anywhere."""
    rdev, backing = loop
    first = {"block device": (7, BLK, 2, b"d", b"", rdev), "char device": (7, CHR, 2, b"d", b"",
                                                                           rdev),
             "FIFO": (7, FIFO, 2, b"d", b"")}[kind]
    data = newc_of([first, (7, REG, 2, b"e", b"PWNED" * 100), (7, first[1], 2, b"f", b"")])
    assert _proof(data).members == 3
    out = tmp_path / "out"
    out.mkdir()
    done = _extract_in_child(data, out)
    assert done.returncode == 0, done.stderr
    d, e, f = (os.lstat(out / n) for n in "def")
    assert d.st_ino == e.st_ino == f.st_ino and d.st_nlink == 3
    assert stat.S_IFMT(e.st_mode) == stat.S_IFMT(first[1])
    if kind.endswith("device"):
        assert (os.major(e.st_rdev), os.minor(e.st_rdev)) == rdev
    assert backing.read_bytes() == b"B" * 65536
    # and GNU cpio makes the same: one inode of the first member's type, nothing written
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], cwd=gnu, input=data, check=True, timeout=20)
    g = [os.lstat(gnu / n) for n in "def"]
    assert len({s.st_ino for s in g}) == 1 and stat.S_IFMT(g[1].st_mode) == stat.S_IFMT(first[1])
    assert backing.read_bytes() == b"B" * 65536


def test_symlinks_are_never_grouped_as_gnu_cpio_does_not(tmp_path, loop):
    """GNU cpio makes each symlink from its own target, and a regular member with the same
    inode number a file of its own: so does the extractor (never writing through the link)."""
    _, backing = loop
    data = newc_of([(7, LNK, 2, b"d", str(backing).encode()), (7, REG, 2, b"e", b"own\n")])
    assert _proof(data).members == 2
    for how in ("ours", "gnu"):
        out = tmp_path / how
        out.mkdir()
        if how == "ours":
            assert _extract_in_child(data, out).returncode == 0
        else:
            subprocess.run(["cpio", "-idm", "--quiet"], cwd=out, input=data, check=True,
                           timeout=20)
        assert os.readlink(out / "d") == str(backing)
        assert (out / "e").read_bytes() == b"own\n" and not os.path.islink(out / "e")
    assert backing.read_bytes() == b"B" * 65536


@pytest.mark.parametrize("carrier", ["last", "first"])
def test_a_group_of_regular_files_gets_its_data_from_whichever_member_carries_it(tmp_path,
                                                                                 carrier):
    body = b"data\n" * 1000
    names = [b"a", b"sub/b", b"c"]
    entries = [(1, stat.S_IFDIR | 0o755, 2, b"sub", b"")]
    for i, n in enumerate(names):
        carries = (i == len(names) - 1) if carrier == "last" else i == 0
        entries.append((7, REG, 3, n, body if carries else b""))
    data = newc_of(entries)
    assert _proof(data).members == 4
    out = tmp_path / "out"
    out.mkdir()
    assert newc.extract(io.BytesIO(data), str(out)) == 4
    st = [os.lstat(out / n.decode()) for n in names]
    assert len({s.st_ino for s in st}) == 1 and st[0].st_nlink == 3
    assert (out / "a").read_bytes() == body


def test_a_group_name_replaced_by_a_file_of_its_own_keeps_it(tmp_path):
    """A later member that takes a group's second name is that name's owner: the group's data
    member relinks the names still its own, not that one."""
    data = newc_of([(7, REG, 3, b"a", b""), (7, REG, 3, b"b", b""), (8, REG, 1, b"b", b"own"),
                    (7, REG, 3, b"c", b"group")])
    assert _proof(data).members == 4
    out = tmp_path / "out"
    out.mkdir()
    newc.extract(io.BytesIO(data), str(out))
    assert (out / "a").read_bytes() == (out / "c").read_bytes() == b"group"
    assert (out / "b").read_bytes() == b"own"


@pytest.mark.parametrize("entries", [
    [(7, REG, 2, b"a", b""), (7, REG, 2, b"a", b"x")],
    [(1, LNK, 1, b".", b"/etc")],
    [(1, REG, 1, b".", b"x")],
], ids=["twice in a group", "root a symlink", "root a file"])
def test_what_the_extractor_refuses_the_proof_refuses(tmp_path, entries):
    data = newc_of(entries)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(newc.UnsafeMember):
        newc.extract(io.BytesIO(data), str(out))
    assert isinstance(_proof(data), newc.UnsafeMember)


@pytest.mark.parametrize("entry", [
    (5, REG, 1, b"zz\0evil", b"x"),  # Python's os calls refuse an embedded NUL
    (5, LNK, 1, b"l", b"/etc\0/passwd"),  # symlink() takes the target up to the NUL
], ids=["name", "symlink target"])
def test_a_nul_inside_a_name_or_a_symlink_target_is_refused_by_the_proof_and_the_unpack(
        tmp_path, entry):
    """Both passed the proof, and the unpack then failed after the slot was cleared (an attack
    of 2026-12-07: the slot left with only lost+found, marked incomplete)."""
    data = newc_of([(4, stat.S_IFDIR | 0o755, 2, b"d", b""), entry])
    with pytest.raises(newc.UnsafeMember, match="NUL"):
        newc.check(io.BytesIO(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(newc.UnsafeMember, match="NUL"):
        newc.extract(io.BytesIO(data), str(out))


def test_the_proof_counts_the_data_the_extractor_writes_but_its_holes(tmp_path):
    """cpio stores a sparse file's holes as zeros, which the extractor leaves holes: the proof
    counts what it writes (a lower bound of the space the unpack takes), so that an image
    that cannot fit is refused before the slot is cleared (a cpio.zst of 350 MiB into a
    300 MiB slot cleared it, then failed: an attack of 2026-12-07)."""
    block = newc.BLOCK
    body = b"x" * (2 * block) + bytes(5 * block) + b"y" * 100
    data = newc_of([(3, REG, 1, b"f", body), (4, REG, 1, b"zeros", bytes(3 * newc.CHUNK))])
    assert newc.check(io.BytesIO(data)).needs_bytes == 2 * block + 100
    out = tmp_path / "out"
    out.mkdir()
    newc.extract(io.BytesIO(data), str(out))
    assert (out / "f").read_bytes() == body
    assert (out / "f").stat().st_blocks * 512 >= 2 * block + 100
    assert (out / "zeros").stat().st_blocks == 0
