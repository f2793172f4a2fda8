"""Proving an archive restorable before the slot is cleared: a full read of its structure.

The archives are made by the real GNU tar, GNU cpio, gzip and zstd; each damaged one is one
that 1.0 let through (its compression intact, or no compression at all) and then failed to
unpack after the slot had been cleared.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile

import pytest

from tests.archives import newc_of, tar_of
from tests.holes import data_ranges
from vmim.archive import CorruptArchive, UnsafeMember, UnsupportedVariant, newc, tar
from vmim.archive.cpio import CpioFormat
from vmim.archive.tar import TarFormat
from vmim.errors import OperationError, StateError


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("guest\n")
    (root / "big").write_bytes(os.urandom(300_000))
    deep = root / ("d" * 90) / ("e" * 90)  # names longer than ustar's 100 bytes
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_text("long\n")
    os.symlink("/etc/hostname", root / "abs-link")
    with open(root / "sparse", "wb") as fh:
        fh.seek(8 << 20)
        fh.write(b"end")
    return root


def _check_tar(data: bytes):
    """The proof of an uncompressed tar holding data (GNU tar reads it from a file)."""
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        return tar.prove(fh.name, None)


def _tar(tree, *options):
    return subprocess.run(["tar", "-c", "-C", str(tree), *options, "."], check=True,
                          capture_output=True).stdout


@pytest.mark.parametrize("options", [["--format=posix", "--sparse"], ["--format=gnu", "--sparse"],
                                     ["--format=ustar"]], ids=["posix", "gnu", "ustar"])
def test_whole_tar_archives_are_proven(tree, options):
    if options == ["--format=ustar"]:
        # ustar cannot carry the long names: this tree without them
        data = subprocess.run(["tar", "-c", "-C", str(tree), "--format=ustar", "etc", "big",
                               "sparse"], check=True, capture_output=True).stdout
    else:
        data = _tar(tree, *options)
    summary = _check_tar(data)
    assert summary.members >= 4
    assert summary.needs_bytes is not None and summary.needs_bytes >= 300_000


def _members_end(data: bytes) -> int:
    """Where the end-of-archive marker starts: the data before the trailing zero blocks."""
    end = len(data)
    while end >= 512 and data[end - 512:end] == bytes(512):
        end -= 512
    return end


def test_a_tar_cut_at_a_member_boundary_is_refused(tree):
    data = _tar(tree, "--format=posix")
    cut = data[:_members_end(data)]
    # GNU tar itself lists it without complaint: that is why 1.0 went ahead
    assert subprocess.run(["tar", "-t"], input=cut, capture_output=True).returncode == 0
    with pytest.raises(CorruptArchive, match="end-of-archive marker"):
        _check_tar(cut)


def test_a_tar_cut_inside_a_member_or_a_header_is_refused(tree):
    data = _tar(tree, "--format=posix")
    for cut in (len(data) // 2, 700, 1536 + 100):
        with pytest.raises(CorruptArchive):
            _check_tar(data[:cut])


def test_a_damaged_tar_header_is_refused(tree):
    data = bytearray(_tar(tree, "--format=posix"))
    data[0:4] = b"XXXX"  # the first header's name: its checksum no longer matches
    with pytest.raises(CorruptArchive, match="GNU tar refuses it: .*not look like a tar"):
        _check_tar(bytes(data))


def test_tar_members_with_dot_dot_are_refused_before_anything_happens(tmp_path):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/../../escape")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"x\n"))
    with pytest.raises(UnsafeMember, match=r"'\.\.'"):
        _check_tar(buf.getvalue())
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("x")
        info.type = tarfile.LNKTYPE
        info.linkname = "../../etc/shadow"
        tf.addfile(info)
    # GNU tar strips the leading "../../" of a hard link's target: a link to etc/shadow of
    # the archive, which is not there
    with pytest.raises(UnsafeMember, match="hard link"):
        _check_tar(link.getvalue())


@pytest.mark.parametrize("compression,tool", [("gzip", "gzip"), ("zstd", "zstd")])
def test_an_intact_compression_holding_a_cut_tar_is_refused(tree, tmp_path, compression, tool):
    data = _tar(tree, "--format=posix")
    cut = data[:_members_end(data) - 4096]
    image = tmp_path / "image"
    image.write_bytes(subprocess.run([tool, "-c"], input=cut, capture_output=True,
                                     check=True).stdout)
    # the compression's own test passes: 1.0's check
    assert subprocess.run([tool, "-t", str(image)], capture_output=True).returncode == 0
    with pytest.raises(StateError, match="cannot be restored: .*ends early"):
        TarFormat(compression, "x").verify(str(image))


@pytest.mark.parametrize("compression,tool", [("gzip", "gzip"), ("zstd", "zstd")])
def test_a_damaged_compression_is_refused_naming_the_decompressor(tree, tmp_path, compression,
                                                                  tool):
    packed = subprocess.run([tool, "-c"], input=_tar(tree, "--format=posix"), check=True,
                            capture_output=True).stdout
    image = tmp_path / "image"
    image.write_bytes(packed[: len(packed) * 2 // 3])
    with pytest.raises(StateError, match="corrupt or truncated"):
        TarFormat(compression, "x").verify(str(image))


def test_an_uncompressed_tar_is_read_without_a_decompressor(tree, tmp_path):
    data = _tar(tree, "--format=posix")
    image = tmp_path / "image"
    image.write_bytes(data)
    assert TarFormat(None, "tar").verify(str(image)).members >= 4
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match="cannot be restored"):
        TarFormat(None, "tar").verify(str(image))


# ------------------------------------------------------------------ cpio


def _cpio(tree, variant):
    names = subprocess.run(["find", "."], cwd=tree, check=True, capture_output=True).stdout
    return subprocess.run(["cpio", "-o", "--quiet", f"--format={variant}"], cwd=tree,
                          input=names, check=True, capture_output=True).stdout


def test_a_whole_newc_archive_is_proven_and_a_cut_one_refused(tree):
    data = _cpio(tree, "newc")
    assert newc.check(io.BytesIO(data)).members >= 6
    trailer = data.rfind(b"TRAILER!!!")
    with pytest.raises(CorruptArchive, match="trailer"):
        newc.check(io.BytesIO(data[: trailer - 110]))  # cut where the trailer's header starts


@pytest.mark.parametrize("variant", ["odc", "bin"])
def test_cpio_variants_the_reader_cannot_unpack_are_refused_up_front(tree, tmp_path, variant):
    with pytest.raises(UnsupportedVariant, match=variant):
        newc.check(io.BytesIO(_cpio(tree, variant)))
    image = tmp_path / "image"
    image.write_bytes(subprocess.run(["bzip2", "-c"], input=_cpio(tree, variant), check=True,
                                     capture_output=True).stdout)
    with pytest.raises(StateError, match=f"{variant}.*newc"):
        CpioFormat("bzip2", "cpio.bz2").verify(str(image))


def test_detection_does_not_call_odc_or_bin_cpio_a_usable_format(tree, tmp_path):
    from vmim.archive import detect

    for variant in ("odc", "bin"):
        image = tmp_path / variant
        image.write_bytes(subprocess.run(["bzip2", "-c"], input=_cpio(tree, variant),
                                         check=True, capture_output=True).stdout)
        found = detect.detect(str(image))
        assert not found.known and f"{variant} variant" in found.description
    image = tmp_path / "newc"
    image.write_bytes(subprocess.run(["bzip2", "-c"], input=_cpio(tree, "newc"), check=True,
                                     capture_output=True).stdout)
    assert detect.detect(str(image)).format == "cpio.bz2"


# ------------------------------------------------------------------ holes


def test_newc_unpack_makes_a_hole_of_every_zero_block_and_only_those(tmp_path):
    """newc has no hole map: the reader re-makes holes block by block (docs/images.md)."""
    src = tmp_path / "src"
    src.mkdir()
    block = 4096
    pattern = b"".join(b"D" * block if i % 3 == 0 else bytes(block) for i in range(30))
    (src / "f").write_bytes(pattern + b"tail")
    data = _cpio(src, "newc")
    out = tmp_path / "out"
    out.mkdir()
    newc.extract(io.BytesIO(data), str(out))
    got = out / "f"
    assert got.read_bytes() == pattern + b"tail"
    ranges = data_ranges(str(got))
    # every data block is data, every zero block a hole
    expected = [(i * block, i * block + block) for i in range(0, 30, 3)]
    assert ranges[:-1] == expected
    assert ranges[-1][0] == 30 * block


# ------------------------------------------------------------------ what the unpack would refuse


def _tar_members(*members, fmt=None):
    import tarfile

    return tar_of(members, fmt or tarfile.PAX_FORMAT)


@pytest.mark.parametrize("members,why", [
    ([("evil", "symlink", "/etc"), ("evil/passwd", "file", b"x")], "passes through"),
    ([("a", "file", b"x"), ("a/b", "file", b"y")], "passes through"),
    ([("d", "dir", ""), ("d/x", "file", b"x"), ("d", "file", b"y")], "replace a directory"),
    ([("x", "hardlink", "not-there")], "hard link"),
], ids=["through a symlink", "through a file", "file over a directory", "dangling hard link"])
def test_tar_members_gnu_tar_would_fail_on_are_refused(members, why, tmp_path):
    data = _tar_members(*members)
    with pytest.raises(UnsafeMember, match=why):
        _check_tar(data)
    # and GNU tar does fail on them (or, for the symlink, is made to by its placeholder)
    out = tmp_path / "x"
    out.mkdir()
    assert subprocess.run(["tar", "-x", "-C", str(out)], input=data,
                          capture_output=True).returncode != 0


def test_tar_sizes_that_are_negative_are_refused():
    import tarfile

    data = bytearray(_tar_members(("f", "file", b"")))
    block = data[:512]
    block[124:136] = b"\xff" * 10 + b"\xfe\x00"  # base-256: -512
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data[:512] = block
    with pytest.raises(CorruptArchive, match="out of off_t range"):
        _check_tar(bytes(data))  # 1 seek back: it looped for ever

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"size": "-512"}
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(CorruptArchive, match="size=-512 is out of range"):
        _check_tar(buf.getvalue())


def test_a_lone_zero_block_at_the_end_is_accepted_as_gnu_tar_does():
    data = _tar_members(("f", "file", b"x"), fmt=None)
    end = 1024  # the header and the data block of "f"
    assert _check_tar(data[:end] + bytes(512)).members == 1


@pytest.mark.parametrize("entries,why", [
    ([(1, 0o40755, 2, b"a", b""), (2, 0o100644, 1, b"a", b"x")], "replace a directory"),
    ([(1, 0o120777, 1, b"evil", b"/etc"), (2, 0o100644, 1, b"evil/passwd", b"x")],
     "passes through"),
    ([(1, 0o100644, 1, b"a", b"x"), (2, 0o100644, 1, b"a/b", b"y")], "passes through"),
    ([(7, 0o100644, 2, b"first", b""), (8, 0o100644, 1, b"first", b"other"),
      (7, 0o100644, 2, b"second", b"data")], "hard link"),
], ids=["file over a directory", "through a symlink", "through a file", "replaced link"])
def test_newc_members_the_extractor_would_refuse_are_refused_up_front(entries, why, tmp_path):
    data = newc_of(entries)
    with pytest.raises(UnsafeMember, match=why):
        newc.check(io.BytesIO(data))
    with pytest.raises(OperationError):  # the extractor, half-way: what the check prevents
        newc.extract(io.BytesIO(data), str(tmp_path))
    if why == "hard link":  # and "first", the other member's now, kept its own data
        assert (tmp_path / "first").read_bytes() == b"other"
