"""How an image reaches a sandboxed command (vmim.handoff.copy_into): through a pipe, every
byte, by splice(2) for one reader and through one buffer for several; a reader that stops or
an image that cannot be read ends the copy as before."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from vmim import handoff


class Reader:
    """A command reading a pipe, its output in a file (a pipe nobody reads would stop it)."""

    def __init__(self, argv, out):
        self.out = out
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=fh)
        self.stdin = self.proc.stdin

    def output(self):
        assert self.proc.wait(timeout=60) == 0
        return self.out.read_bytes()


def _readers(tmp_path, n, argv):
    return [Reader(argv, tmp_path / f"out{i}") for i in range(n)]


def _image(tmp_path, size=(5 << 20) + 12345):
    src = tmp_path / "image"
    src.write_bytes(os.urandom(size))
    return src


def _spliced(monkeypatch):
    """Count the splice(2) calls copy_into makes (os.splice itself does the work)."""
    calls = []
    real = os.splice

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "splice", counting)
    return calls


@pytest.mark.skipif(not hasattr(os, "splice"), reason="os.splice needs Python 3.10")
def test_one_reader_gets_every_byte_by_splice(tmp_path, monkeypatch):
    src = _image(tmp_path)
    calls = _spliced(monkeypatch)
    (reader,) = _readers(tmp_path, 1, ["cat"])
    with open(src, "rb") as fh:
        assert handoff.copy_into(fh, [reader.stdin]) is True
    assert reader.output() == src.read_bytes()
    assert len(calls) >= 6  # 5 MiB and a bit in 1 MiB splices, and the one that reads the end


def test_several_readers_get_the_same_bytes_through_one_buffer(tmp_path, monkeypatch):
    src = _image(tmp_path)
    calls = _spliced(monkeypatch) if hasattr(os, "splice") else []
    readers = _readers(tmp_path, 3, ["sha256sum"])
    with open(src, "rb") as fh:
        assert handoff.copy_into(fh, [r.stdin for r in readers]) is True
    sums = {r.output().split()[0] for r in readers}
    expected = subprocess.run(["sha256sum", str(src)], capture_output=True, check=True)
    assert sums == {expected.stdout.split()[0]}
    assert calls == []


def _refuses(*args):
    raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("splice", ["missing", "refused"])
def test_without_splice_one_reader_gets_every_byte_copied(tmp_path, monkeypatch, splice):
    """Python 3.9 has no os.splice, and a file whose filesystem cannot splice refuses the
    first call (EINVAL): the copy through the buffer."""
    if splice == "missing":
        monkeypatch.delattr(os, "splice", raising=False)
    elif not hasattr(os, "splice"):
        pytest.skip("os.splice needs Python 3.10")
    else:
        monkeypatch.setattr(os, "splice", _refuses)
    src = _image(tmp_path)
    (reader,) = _readers(tmp_path, 1, ["cat"])
    with open(src, "rb") as fh:
        assert handoff.copy_into(fh, [reader.stdin]) is True
    assert reader.output() == src.read_bytes()


@pytest.mark.parametrize("call", ["splice", "readv"])
def test_a_read_error_half_way_is_raised_not_taken_for_the_end(tmp_path, monkeypatch, call):
    """A failing disk (EIO) after some data went: the error goes on (the pipeline raises it,
    vmim.process._feed), never a short image taken for a whole one nor a copy started over;
    by splice (one reader) and by the buffer (without splice)."""
    if call == "splice" and not hasattr(os, "splice"):
        pytest.skip("os.splice needs Python 3.10")
    if call == "readv":
        monkeypatch.delattr(os, "splice", raising=False)
    real, calls = getattr(os, call), []

    def fails_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, fails_second)
    src = _image(tmp_path)
    (reader,) = _readers(tmp_path, 1, ["cat"])
    with open(src, "rb") as fh, pytest.raises(OSError) as info:
        handoff.copy_into(fh, [reader.stdin])
    assert info.value.errno == errno.EIO
    assert reader.output() == src.read_bytes()[:1 << 20]  # the first piece only


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_a_reader_that_stops_ends_the_copy(tmp_path, monkeypatch, splice):
    if not splice:
        monkeypatch.delattr(os, "splice", raising=False)
    elif not hasattr(os, "splice"):
        pytest.skip("os.splice needs Python 3.10")
    src = _image(tmp_path, 64 << 20)
    (reader,) = _readers(tmp_path, 1, ["head", "-c", "10"])
    with open(src, "rb") as fh:
        assert handoff.copy_into(fh, [reader.stdin]) is False
    assert reader.output() == src.read_bytes()[:10]


def test_a_failed_reader_stops_the_copy(tmp_path):
    """fan_out's readers report a failure through `failed`: nothing more is copied."""
    src = _image(tmp_path)
    (reader,) = _readers(tmp_path, 1, ["cat"])
    with open(src, "rb") as fh:
        assert handoff.copy_into(fh, [reader.stdin], failed=[RuntimeError("x")]) is False
    reader.stdin.close()
    assert reader.output() == b""
