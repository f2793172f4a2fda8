"""The proof refuses exactly what the unpack refuses (issue 20, finding 2).

Each archive here is one that the proof of 2026-12-05 passed and GNU tar, unpacking with the
tool's own options (vmim.archive.tar.EXTRACT), then refused, after the slot had been cleared;
or, the other way round, one GNU tar unpacks and the proof refused. Every test unpacks with the
real unpack (TarFormat.unpack) into an empty directory, so it shows what the proof must predict.

Root: the unpack keeps owners and makes device nodes, as it does on a slot.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from tests.archives import fix_tar_checksum, tar_entries, tar_members_end
from vmim.archive.tar import TarFormat
from vmim.errors import StateError, VmimError

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tar") is None,
                                reason="unpacking keeps owners and makes device nodes: needs "
                                       "root and GNU tar")

REG, SYM, LNK, CHR, DIR = (tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                           tarfile.DIRTYPE)


def _unpack(data: bytes, tmp_path) -> str:
    """Unpack data as a restore does into a new empty directory; return that directory."""
    image = tmp_path / "image.tar"
    image.write_bytes(data)
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    TarFormat(None, "tar").unpack(str(image), str(out))
    return str(out)


def _prove(data: bytes, tmp_path):
    image = tmp_path / "proved.tar"
    image.write_bytes(data)
    return TarFormat(None, "tar").verify(str(image))


def _assert_both_refuse(data: bytes, tmp_path, why: str) -> None:
    with pytest.raises(VmimError):  # what happened after the slot was cleared
        _unpack(data, tmp_path)
    with pytest.raises(StateError, match=why):
        _prove(data, tmp_path)


# ------------------------------------------------------------------ (a) GNU sparse members


@pytest.fixture(scope="module")
def sparse_tars(tmp_path_factory):
    """Real sparse archives of one sparse file, by GNU tar: pax 0.0, 0.1, 1.0 and old GNU."""
    src = tmp_path_factory.mktemp("sparse")
    with open(src / "sp", "wb") as fh:
        fh.write(b"A" * 5000)
        fh.seek(1 << 20)
        fh.write(b"B" * 100)
        fh.seek(3 << 20)
        fh.write(b"C")
    out = {}
    for version in ("0.0", "0.1", "1.0"):
        out[version] = subprocess.run(
            ["tar", "-c", "-C", str(src), "--format=posix", "--sparse",
             f"--sparse-version={version}", "sp"], check=True, capture_output=True).stdout
    out["gnu"] = subprocess.run(["tar", "-c", "-C", str(src), "--format=gnu", "--sparse", "sp"],
                                check=True, capture_output=True).stdout
    return out


def _sparse_1_0_map(data: bytes) -> int:
    """Where the in-data map of a sparse 1.0 member starts (the block after its header)."""
    return data.index(b"GNUSparseFile") // 512 * 512 + 512


def _bad_sparse(sparse_tars, how: str) -> bytes:
    if how == "1.0 map not a number":
        data = bytearray(sparse_tars["1.0"])
        at = _sparse_1_0_map(bytes(data))
        data[at:at + 1] = b"x"
        return bytes(data)
    if how == "1.0 map count overflows":
        data = bytearray(sparse_tars["1.0"])
        at = _sparse_1_0_map(bytes(data))
        end = data.index(b"\n", at)
        data[at:end] = b"9" * (end - at)
        return bytes(data)
    if how in ("0.1 map", "0.0 numbytes"):
        data = sparse_tars["0.1" if how == "0.1 map" else "0.0"]
        key = b"GNU.sparse.map=" if how == "0.1 map" else b"GNU.sparse.numbytes="
        # the first digit of the value becomes a letter: the record keeps its length
        return re.sub(re.escape(key) + b"[0-9]", key + b"x", data, count=1)
    assert how == "old GNU map"
    data = bytearray(sparse_tars["gnu"])
    header = bytearray(data[:512])
    assert header[156:157] == b"S"
    header[386 + 7] = ord("x")  # the first map entry's offset
    data[:512] = fix_tar_checksum(bytes(header))
    return bytes(data)


@pytest.mark.parametrize("how", ["1.0 map not a number", "1.0 map count overflows", "0.1 map",
                                 "0.0 numbytes", "old GNU map"])
def test_a_sparse_member_with_a_malformed_map_is_refused(sparse_tars, tmp_path, how):
    _assert_both_refuse(_bad_sparse(sparse_tars, how), tmp_path, "sparse|GNU tar")


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0", "gnu"])
def test_real_sparse_archives_are_proven_and_unpack(sparse_tars, tmp_path, version):
    summary = _prove(sparse_tars[version], tmp_path)
    assert summary.members == 1
    # never its holes; nor its data: what lies between its header and the next holds its
    # map and extended headers too, which a guest can make large (test_fits.py)
    assert summary.needs_bytes == 0
    out = _unpack(sparse_tars[version], tmp_path)
    assert os.path.getsize(os.path.join(out, "sp")) == (3 << 20) + 1


# ------------------------------------------------------------------ (b) the root entry


@pytest.mark.parametrize("name", [".", "", "/", "./"])
@pytest.mark.parametrize("typ", [SYM, REG, CHR], ids=["symlink", "file", "device"])
def test_a_root_entry_that_is_not_a_directory_is_refused(tmp_path, name, typ):
    if name == "" and typ != REG:
        pytest.skip("tarfile cannot write an empty name for this type")  # covered by "/"
    fmt = tarfile.USTAR_FORMAT if name == "" else tarfile.PAX_FORMAT
    data = tar_entries([("etc", DIR, b"", "", {}),
                        (name, typ, b"x" if typ == REG else b"", "target", {})], fmt=fmt)
    _assert_both_refuse(data, tmp_path, "directory|GNU tar")


def test_a_root_entry_that_is_a_hard_link_is_refused(tmp_path):
    data = tar_entries([("a", REG, b"x", "", {}), (".", LNK, b"", "a", {})])
    _assert_both_refuse(data, tmp_path, "directory|GNU tar")


def test_a_root_entry_that_is_a_directory_is_fine(tmp_path):
    data = tar_entries([(".", DIR, b"", "", {}), ("./a", REG, b"x", "", {})])
    assert _prove(data, tmp_path).members == 2
    assert os.listdir(_unpack(data, tmp_path)) == ["a"]


# ------------------------------------------------------------------ (c) global pax headers


@pytest.mark.parametrize("records", [{"path": "../x"}, {"size": "0"}, {"uid": str(1 << 33)}],
                         ids=["path", "size", "uid"])
def test_a_global_pax_header_counts_for_the_members_after_it(tmp_path, records):
    data = tar_entries([("a", REG, b"x\n", "", {}), ("b", REG, b"y\n", "", {})],
                       global_pax=records)
    _assert_both_refuse(data, tmp_path, r"'\.\.'|GNU tar")


# ------------------------------------------------------------------ (d) numeric pax fields


@pytest.mark.parametrize("records", [
    {"uid": str(1 << 32)}, {"gid": str(1 << 40)}, {"uid": "-1"}, {"uid": "12x"},
    {"mtime": "1" + "0" * 30}, {"size": "1x"},
], ids=["uid 2^32", "gid 2^40", "uid -1", "uid garbage", "mtime 10^30", "size garbage"])
def test_numeric_pax_fields_gnu_tar_rejects_are_refused(tmp_path, records):
    data = tar_entries([("a", REG, b"x\n", "", records)])
    _assert_both_refuse(data, tmp_path, "GNU tar|pax")


@pytest.mark.parametrize("records", [{"uid": str((1 << 32) - 1)}, {"mtime": "-5"},
                                     {"mtime": "12x"}], ids=["uid 2^32-1", "mtime -5",
                                                             "mtime garbage"])
def test_numeric_pax_fields_gnu_tar_takes_are_proven(tmp_path, records):
    data = tar_entries([("a", REG, b"x\n", "", records)])
    assert _prove(data, tmp_path).members == 1
    assert os.listdir(_unpack(data, tmp_path)) == ["a"]


# ------------------------------------------------------------------ (e) a lone zero block


def _lone_zero_block() -> bytes:
    """What Java's plexus archiver writes: one zero block after a member, then more members."""
    first = tar_entries([("a", REG, b"a\n", "", {})], fmt=tarfile.USTAR_FORMAT)
    rest = tar_entries([("b", REG, b"b\n", "", {}), ("c", REG, b"c\n", "", {})],
                       fmt=tarfile.USTAR_FORMAT)
    return first[:tar_members_end(first)] + bytes(512) + rest


def test_a_lone_zero_block_before_more_members_is_proven_and_every_member_unpacked(tmp_path):
    data = _lone_zero_block()
    # GNU tar's default stops there, warns, and exits 0: the members after it would be lost
    plain = subprocess.run(["tar", "-t"], input=data, capture_output=True)
    assert plain.returncode == 0 and plain.stdout == b"a\n"
    assert b"A lone zero block" in plain.stderr
    assert _prove(data, tmp_path).members == 3
    assert sorted(os.listdir(_unpack(data, tmp_path))) == ["a", "b", "c"]


def test_a_lone_zero_block_at_the_end_is_proven(tmp_path):
    first = tar_entries([("a", REG, b"a\n", "", {})], fmt=tarfile.USTAR_FORMAT)
    data = first[:tar_members_end(first)] + bytes(512)
    assert _prove(data, tmp_path).members == 1
    assert os.listdir(_unpack(data, tmp_path)) == ["a"]


def test_a_tar_cut_at_a_member_boundary_is_still_refused(tmp_path):
    """Stricter than GNU tar on purpose: a truncated image is not restored (GNU tar takes it)."""
    data = tar_entries([("a", REG, b"a\n", "", {}), ("b", REG, b"b\n", "", {})])
    cut = data[:tar_members_end(data)]
    assert sorted(os.listdir(_unpack(cut, tmp_path))) == ["a", "b"]
    with pytest.raises(StateError, match="end-of-archive marker"):
        _prove(cut, tmp_path)


def test_garbage_after_the_end_is_refused_as_the_unpack_refuses_it(tmp_path):
    data = tar_entries([("a", REG, b"a\n", "", {})]) + b"\x01" * 1024
    _assert_both_refuse(data, tmp_path, "GNU tar")


def test_the_proof_reads_a_compressed_image_once_with_gnu_tar(tmp_path):
    data = tar_entries([("a", REG, b"a\n", "", {}), ("b", LNK, b"", "a", {})])
    image = tmp_path / "image.tar.zst"
    image.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=data, check=True,
                                     capture_output=True).stdout)
    assert TarFormat("zstd", "tar.zst").verify(str(image)).members == 2
    image.write_bytes(image.read_bytes()[:-8])  # the frame's end cut off
    with pytest.raises(StateError, match="corrupt or truncated"):
        TarFormat("zstd", "tar.zst").verify(str(image))


def test_names_gnu_tar_lists_are_read_back_exactly(tmp_path):
    """Names with quotes, arrows, newlines and bytes that are not UTF-8 reach the layout check
    as they are: a later member through such a symlink is refused."""
    odd = 'we"ird -> x\nline \\ \udcff'
    data = tar_entries([(odd, SYM, b"", "/etc", {}), (odd + "/passwd", REG, b"x", "", {})],
                       fmt=tarfile.GNU_FORMAT)
    with pytest.raises(StateError, match="passes through"):
        _prove(data, tmp_path)
    ok = tar_entries([(odd, SYM, b"", "t -> u", {}), ("h", LNK, b"", odd, {})],
                     fmt=tarfile.GNU_FORMAT)
    assert _prove(ok, tmp_path).members == 2
    assert os.readlink(os.path.join(_unpack(ok, tmp_path), "h")) == "t -> u"


def test_listing_parser_round_trips_every_byte():
    from vmim.archive.tar import unquote_c

    raw = bytes(range(1, 256))
    quoted = subprocess.run(
        ["tar", "-t", "--quoting-style=c"], capture_output=True, check=True,
        input=tar_entries([(raw.decode("utf-8", "surrogateescape"), REG, b"", "", {})],
                          fmt=tarfile.GNU_FORMAT)).stdout.rstrip(b"\n")
    assert quoted[:1] == quoted[-1:] == b'"'
    assert unquote_c(quoted[1:-1].decode("ascii")) == raw.decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------ (x) record sizes


def _record_variants(src):
    """The same two files in archives of other record sizes than the unpack's (it reads 1 MiB
    records: vmim.archive.tar.EXTRACT's --blocking-factor), and ending otherwise than
    padded to a whole record."""
    def gnu(factor):
        return subprocess.run(["tar", "-c", "-C", str(src), "-b", str(factor), "."],
                              check=True, capture_output=True).stdout

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.add(str(src), arcname=".")
    one = gnu(1)
    body = one.rstrip(b"\0")
    body += b"\0" * (-len(body) % 512)
    return {"factor 1": one, "factor 20": gnu(20), "factor 4096": gnu(4096),
            "Python tarfile": buf.getvalue(), "two zero blocks, no padding": body + b"\0" * 1024,
            "one zero block": body + b"\0" * 512, "cut in its end": one[:-100]}


@pytest.mark.parametrize("variant", ["factor 1", "factor 20", "factor 4096", "Python tarfile",
                                     "two zero blocks, no padding", "one zero block",
                                     "cut in its end"])
def test_an_archive_of_any_record_size_is_proven_and_unpacked_whole(tmp_path, variant):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "a").write_text("a\n")
    (src / "big").write_bytes(os.urandom(300_000))
    data = _record_variants(src)[variant]
    assert _prove(data, tmp_path).members == 4  # ., etc, etc/a, big
    out = _unpack(data, tmp_path)
    assert open(os.path.join(out, "etc", "a")).read() == "a\n"
    assert open(os.path.join(out, "big"), "rb").read() == (src / "big").read_bytes()
