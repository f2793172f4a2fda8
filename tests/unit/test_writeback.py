"""The writeback pusher: a restore's data goes to the disk while the unpack runs."""

from __future__ import annotations

import ctypes
import os
import threading

import pytest

from vmim import writeback

_CACHESTAT = 451  # x86_64 and most others: cachestat(2), Linux 6.5


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback",
                                               "nr_evicted", "nr_recently_evicted")]


def dirty_pages(path) -> int:
    """Pages of the file that are dirty in the page cache (cachestat(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Stat()
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(st), 0) != 0:
            pytest.skip(f"no cachestat(2) here: {os.strerror(ctypes.get_errno())}")
        return st.nr_dirty + st.nr_writeback
    finally:
        os.close(fd)


def _threads():
    return [t for t in threading.enumerate() if t.name == writeback.THREAD_NAME]


def _open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def _wait_for_calls(pusher, n):
    done = threading.Event()
    for _ in range(6000):  # a bound, not a timing: each step waits 10 ms
        if pusher.calls >= n:
            return
        done.wait(0.01)
    raise AssertionError(f"the pusher made {pusher.calls} syncfs calls, not {n}")


def test_the_data_written_during_the_body_reaches_the_disk_before_it_ends(tmp_path):
    data = tmp_path / "written"
    with open(data, "wb") as fh:  # dirty pages and nothing else: no fsync
        fh.write(os.urandom(1 << 20) * 16)
    assert dirty_pages(data) > 0
    with writeback.pushed_to_disk(str(tmp_path), interval=0.01) as pusher:
        _wait_for_calls(pusher, 2)  # one syncfs began after the write ended, and returned
        assert dirty_pages(data) == 0
    assert pusher.errors == 0


def test_the_thread_stops_and_its_descriptor_closes_on_leaving(tmp_path):
    before = _open_fds()
    with writeback.pushed_to_disk(str(tmp_path), interval=0.01) as pusher:
        assert len(_threads()) == 1
        _wait_for_calls(pusher, 1)
    assert _threads() == [] and _open_fds() == before


def test_an_exception_in_the_body_passes_through_and_stops_the_thread(tmp_path):
    before = _open_fds()
    with pytest.raises(KeyError, match="unpack failed"):
        with writeback.pushed_to_disk(str(tmp_path), interval=0.01):
            raise KeyError("unpack failed")
    assert _threads() == [] and _open_fds() == before


def test_a_path_that_is_not_a_directory_is_an_error_before_any_thread(tmp_path):
    with pytest.raises(FileNotFoundError):
        with writeback.pushed_to_disk(str(tmp_path / "missing")):
            pass
    assert _threads() == []
