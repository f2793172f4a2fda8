"""vmim.disk.qcow2.checked_chain with real qemu-img (no root): the names a qcow2 image carries are
checked level by level, and nothing they name is opened before its check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vmim.disk import qcow2
from vmim.errors import StateError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def create(cwd, *argv):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *argv], check=True, cwd=cwd)


@pytest.mark.parametrize("name,protocol", [
    ("nbd:host:10809", True), ("json:{}", True), ("file:/etc/passwd", True),
    ("http://x/y", True), ("base", False), ("dir/a:b", False), ("/abs/a:b", False),
    ("./nbd:x", False),
])
def test_a_colon_before_the_first_slash_is_a_protocol_as_qemu_decides(name, protocol):
    assert qcow2._has_protocol(name) is protocol


def test_a_chain_inside_the_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    create(store, "base", "1M")
    create(store, "-b", "base", "-F", "qcow2", "mid")
    create(store, "-b", str(store / "mid"), "-F", "qcow2", "top")
    assert qcow2.checked_chain(str(store / "top"), str(store), "image 'top'") == \
        [str(store / "mid"), str(store / "base")]


def test_a_relative_data_file_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    create(store, "-o", "data_file=data.raw", "img", "1M")
    with pytest.raises(StateError, match="data file 'data.raw' is relative"):
        qcow2.checked_chain(str(store / "img"), str(store), "image 'img'")


def test_a_loop_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    create(store, "a", "1M")
    create(store, "-b", "a", "-F", "qcow2", "b")
    create(store, "-u", "-b", "b", "-F", "qcow2", "a.new", "1M")
    os.replace(store / "a.new", store / "a")  # a stands on b, which stands on a
    with pytest.raises(StateError, match="loops back"):
        qcow2.checked_chain(str(store / "b"), str(store), "image 'b'")


def test_a_backing_device_is_refused_even_without_a_store(tmp_path):
    create(tmp_path, "-u", "-b", "/dev/null", "-F", "raw", "img", "1M")
    with pytest.raises(StateError, match="not a regular file"):
        qcow2.checked_chain(str(tmp_path / "img"), None, "disk 'img'")


def test_nothing_an_image_names_is_opened_before_its_check(tmp_path):
    """A FIFO blocks whoever opens it: an image whose backing file and data file are FIFOs is
    refused promptly, so qemu-img info (one file, no --backing-chain) opened neither."""
    import signal

    create(tmp_path, "-o", f"data_file={tmp_path / 'data'}", "with-data", "1M")
    os.unlink(tmp_path / "data")
    os.mkfifo(tmp_path / "data")
    os.mkfifo(tmp_path / "back")
    create(tmp_path, "-u", "-b", str(tmp_path / "back"), "-F", "raw", "with-back", "1M")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("something opened a FIFO"))
    signal.alarm(30)
    try:
        for img in ("with-data", "with-back"):
            with pytest.raises(StateError, match="not a regular file"):
                qcow2.checked_chain(str(tmp_path / img), None, f"image '{img}'")
    finally:
        signal.alarm(0)
