"""A command's output on its way to a file (process.pipeline(checksum=True)): hashed as it
passes and handed to the disk in steps, so that neither the checksum nor the final fsync of an
image costs a second pass over it."""

from __future__ import annotations

import fcntl
import functools
import mmap
import os
from typing import Any

from vmim import digest as digest_mod

#: fcntl(2) F_SETPIPE_SZ: a pipe's buffer size
F_SETPIPE_SZ = 1031
#: bytes moved per read, write or splice, and the size of a pipe made wide
CHUNK = 1 << 20
#: Written output is handed to the disk in steps of this size while a pipeline runs, so that
#: the fsync at its end has little left to wait for.
WRITEBACK_STEP = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    """libc's sync_file_range(2) (start writeback without waiting), or None."""
    import ctypes  # here: not worth its import time for the commands that never write archives

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # libc as loaded: find_library would run ldconfig
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def widen(pipe: Any) -> None:
    """A pipe made CHUNK large, not 64 KiB: its writer and reader move larger pieces, fewer
    times. Between a decompressor and tar: Debian 12's 650 MB unpacked into the bench slot in
    2.39-2.61 s against 2.57-2.74 s (2026-12-08). Nothing where it is not a pipe (an image
    read directly) or the system's limit is lower."""
    try:
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass


def write_all(fd: int, view: memoryview, n: int) -> None:
    """Write the first n bytes of view to fd, each slice released (view's buffer can close)."""
    done = 0
    while done < n:
        with view[done:n] as piece:
            done += os.write(fd, piece)


def copy_hashing(src: Any, fd: int) -> str:
    """Copy a pipe into fd, hashing what passes (vmim.digest: BLAKE3, else sha256) and starting
    its writeback as it goes: the checksum and most of the fsync of an image cost no second
    pass over it (src: a pipe vmim.process.pipeline made, and widened). Returns the tagged
    digest ('ALGORITHM:HEX')."""
    writeback = _sync_file_range()
    digest = digest_mod.new()
    written = synced = 0
    # one page-aligned buffer, as vmim.digest.of_open reads into (a fresh bytes object a
    # read is malloc'd where the kernel's copy into it may run at a fraction of its speed)
    with mmap.mmap(-1, CHUNK) as buf, memoryview(buf) as view:
        while True:
            n = os.readv(src.fileno(), [view])
            if not n:
                return digest_mod.tagged(digest)
            with view[:n] as chunk:
                digest.update(chunk)
            write_all(fd, view, n)
            written += n
            if writeback is not None and written - synced >= WRITEBACK_STEP:
                writeback(fd, synced, written - synced, _SYNC_FILE_RANGE_WRITE)
                synced = written
