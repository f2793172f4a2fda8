"""The newc extractor on damaged and hostile streams (members are made by GNU cpio)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest

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
