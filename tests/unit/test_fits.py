"""The shape of an unpack (vmim.archive.Layout, tar.shape_of_index) and what the kernel and a
filesystem take of it (vmim.archive.fits). The restores they stop are in
tests/integration/test_after_the_clear.py."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from vmim.archive import Layout, Summary, UnsafeMember, fits, newc, tar
from vmim.archive.cpio import CpioFormat, survey
from vmim.archive.tar import shape_of_index
from vmim.errors import StateError


def test_the_layout_counts_inodes_names_per_inode_and_the_longest_component():
    lay = Layout("tar member", rmdir_empty=True)
    lay.add("./a/b/file", "f")  # a and b made as parents: 3 inodes
    lay.link("./a/h1", "./a/b/file")
    lay.link("./a/h2", "./a/h1")  # a link to a link: the same inode
    lay.add("./a/h1", "f")  # replaced by a file of its own: one name less for the first
    lay.add("./" + "x" * 200, "f")
    assert lay.inodes == 5
    assert lay.most_links == 3
    assert lay.names_of[lay.inode_of[("a", "b", "file")]] == 2
    assert lay.longest_component == 200


def test_the_kernels_bounds_are_its_own():
    fits.device_ok("m", "ok", fits.MAJOR_MAX, fits.MINOR_MAX)
    for major, minor in ((fits.MAJOR_MAX + 1, 0), (0, fits.MINOR_MAX + 1), (-1, 0)):
        with pytest.raises(UnsafeMember, match="cannot make"):
            fits.device_ok("m", "dev", major, minor)
    fits.symlink_ok("m", "ok", fits.PATH_MAX)
    with pytest.raises(UnsafeMember, match="4095 at most"):
        fits.symlink_ok("m", "long", fits.PATH_MAX + 1)


def test_check_names_each_bound_the_filesystem_sets(tmp_path):
    vfs = os.statvfs(tmp_path)
    fits.check(str(tmp_path), "ext4", Summary(1, None, longest_component=vfs.f_namemax), "ok")
    fits.check(str(tmp_path), "ext4", None, "a digest-proven image of an older store")
    with pytest.raises(StateError) as exc:
        fits.check(str(tmp_path), "xfs", Summary(1, None, longest_component=vfs.f_namemax + 1,
                                                 longest_symlink=1025,
                                                 most_links=2 ** 31), "odd")
    said = str(exc.value)
    assert "image 'odd'" in said and "not touched" in said
    assert f"a name of {vfs.f_namemax + 1} bytes" in said
    assert "xfs keeps 1024" in said and "names of one file" in said


@pytest.mark.skipif(os.geteuid() != 0, reason="GNU tar archives the tree as root does")
def test_the_shape_of_gnu_tars_own_listing_of_a_store(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    for n in range(3):
        os.link(src / "d" / "f", src / "d" / f"h{n}")
    os.symlink("t" * 1500, src / "long")
    subprocess.run(["tar", "--create", "--file=/dev/null", f"--index-file={tmp_path}/list",
                    "--verbose", "--verbose", "--block-number", "--full-time",
                    "--quoting-style=c", "-C", str(src), "."], check=True)
    with open(tmp_path / "list", "rb") as fh:
        shape = shape_of_index(fh)
    assert shape == {"inodes": 3, "most_links": 4, "longest_symlink": 1500, "data": 1}


@pytest.mark.skipif(os.geteuid() != 0, reason="GNU tar archives the tree as root does")
def test_the_stores_count_of_data_is_the_proofs_on_the_same_archive(tmp_path):
    """A restore proven by the digest checks the bytes the store's listing counted, as one
    proven by a full read checks the proof's: the two agree, holes and pax headers included."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(os.urandom(100))
    (src / "big").write_bytes(os.urandom(300_001))
    (src / ("n" * 200)).write_bytes(os.urandom(5000))  # a pax header of its own for the name
    with open(src / "sparse", "wb") as fh:  # holes GNU tar stores as a sparse map
        fh.truncate(50 << 20)
        fh.write(b"head")
        fh.seek(20 << 20)
        fh.write(os.urandom(70_000))
    os.link(src / "big", src / "again")
    (src / "zz-last").write_bytes(os.urandom(1000))  # not counted: no member bounds it
    archive = tmp_path / "x.tar"
    subprocess.run(["tar", "--create", "--sort=name", f"--file={archive}", *tar.CREATE,
                    f"--index-file={tmp_path}/list", *tar.INDEXED[1:], "-C", str(src), "."],
                   check=True)
    with open(tmp_path / "list", "rb") as fh:
        shape = shape_of_index(fh)
    assert shape is not None
    proven = tar.prove(str(archive), None).needs_bytes
    assert shape["data"] == proven - 1000
    assert proven == 1000 + 100 + 300_001 + 5000  # the sparse file's data is not counted


@pytest.mark.skipif(os.geteuid() != 0, reason="GNU tar archives the tree as root does")
def test_files_of_holes_count_no_data_whatever_their_headers(tmp_path):
    """Files that are all holes, with long names and an xattr each (their extended headers
    between them): the store's listing and the proof counted 4.5 KiB of data a file, and a tree
    of them that fits its own slot was refused (attack G of 2026-12-07)."""
    src = tmp_path / "src"
    deep = src / ("p" * 200) / ("q" * 200)
    deep.mkdir(parents=True)
    for n in range(40):
        f = deep / (f"{n:03}" + "n" * 240)
        with open(f, "wb") as fh:
            fh.truncate(1 << 20)
        os.setxattr(f, "user.x", b"v" * 900)
    archive = tmp_path / "x.tar"
    subprocess.run(["tar", "--create", f"--file={archive}", *tar.CREATE,
                    f"--index-file={tmp_path}/list", *tar.INDEXED[1:], "-C", str(src), "."],
                   check=True)
    with open(tmp_path / "list", "rb") as fh:
        shape = shape_of_index(fh)
    assert shape is not None and shape["data"] == 0
    assert tar.prove(str(archive), None).needs_bytes == 0


def test_a_name_gnu_tar_could_not_unpack_is_refused_at_the_store():
    line = f'block 0: -rw-r--r-- 0/0 1 2026-12-07 07:12:23.8 "./{"d/" * 2100}f"\n'
    with pytest.raises(StateError, match="nothing was stored"):
        shape_of_index(io.BytesIO(line.encode()))
    assert shape_of_index(io.BytesIO(b"not a listing line at all\n")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the store's find and cpio run in the sandbox")
def test_the_cpio_stores_survey_is_the_shape_the_proof_reads_from_its_archive(tmp_path):
    """A cpio image proven by its digest is checked against the shape the store's survey of
    the tree recorded; it is the one newc.check reads from the archive the store wrote."""
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    for n in range(4):
        os.link(src / "d" / "f", src / "d" / "e" / f"h{n}")
    os.symlink("t" * 1500, src / "long")
    os.symlink("d", src / "to-a-directory")  # os.walk lists it among the directories
    (src / ("n" * 200)).write_text("y")
    (src / "lost+found").mkdir()  # left out by the store, as its find prunes it
    (src / "lost+found" / "#12").write_text("z")
    fmt = CpioFormat(None, "cpio")
    fmt.check_tree(str(src), "test")
    archive = tmp_path / "x.cpio"
    fmt.write(str(src), ["."], str(archive))
    with open(archive, "rb") as fh:
        proof = newc.check(fh)
    assert fmt.shape == {"inodes": 6, "most_links": 5, "longest_component": 200,
                         "longest_symlink": 1500}
    assert (proof.inodes, proof.most_links, proof.longest_component, proof.longest_symlink) \
        == (6, 5, 200, 1500)


def _deep(root, depth, name):
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def test_the_cpio_stores_survey_walks_a_guest_tree_of_any_depth(tmp_path):
    """os.walk recursed: a guest tree 1100 directories deep (a 2200-byte path) made the store
    fail with Python's RecursionError. One too deep for cpio's names is refused by name."""
    try:
        _deep(tmp_path / "ok", 1100, "d")
        _, _, shape = survey(str(tmp_path / "ok"))
        assert shape["inodes"] == 1101
        _deep(tmp_path / "deep", 500, "d" * 10)  # 5500 bytes
        with pytest.raises(StateError, match="longer than 4095 bytes.*nothing was stored"):
            survey(str(tmp_path / "deep"), "box x: store y")
    finally:  # pytest's own removal of tmp_path recurses too
        subprocess.run(["rm", "-rf", "--", str(tmp_path / "ok"), str(tmp_path / "deep")],
                       check=True)


@pytest.mark.parametrize("answer", [
    None, [], {"big": [], "big_count": 0, "xattrs": 0},
    {"big": [], "big_count": 0, "xattrs": 0, "shape": {}, "more": 1},
    {"big": ["a"] * 6, "big_count": 6, "xattrs": 0, "shape": {}},
    {"big": [7], "big_count": 1, "xattrs": 0, "shape": {}},
    {"big": [], "big_count": -1, "xattrs": 0,
     "shape": {"inodes": 1, "most_links": 1, "longest_component": 1, "longest_symlink": 0}},
    {"big": [], "big_count": 0, "xattrs": True,
     "shape": {"inodes": 1, "most_links": 1, "longest_component": 1, "longest_symlink": 0}},
    {"big": [], "big_count": 0, "xattrs": 0,
     "shape": {"inodes": "1", "most_links": 1, "longest_component": 1, "longest_symlink": 0}},
    {"big": [], "big_count": 0, "xattrs": 0, "shape": {"inodes": 1}},
    {"big": ["a"], "big_count": 0, "xattrs": 0,  # a big file, and none counted
     "shape": {"inodes": 1, "most_links": 1, "longest_component": 1, "longest_symlink": 0}},
    {"big": [], "big_count": 2, "xattrs": 0,  # two counted, none named
     "shape": {"inodes": 1, "most_links": 1, "longest_component": 1, "longest_symlink": 0}},
])
def test_the_sandboxed_surveys_answer_is_checked_before_it_is_believed(answer):
    """The survey reads the guest's tree in the sandbox; what it answers is data from a
    process that read guest data: in its declared shape, or an internal error."""
    from vmim.archive.cpio import survey_answer
    from vmim.errors import OperationError

    with pytest.raises(OperationError, match="the survey in the sandbox answered"):
        survey_answer(answer)
    good = {"big": list("vwxyz"), "big_count": 9, "xattrs": 2,
            "shape": {"inodes": 3, "most_links": 1, "longest_component": 4, "longest_symlink": 0}}
    assert survey_answer(good) == (list("vwxyz"), 9, 2, good["shape"])
