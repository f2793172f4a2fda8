"""What a sandboxed command is handed as its standard streams: pipes and unlinked temporary
files, never a host file that has a name. A command in the sandbox of guest data (vmim.sandbox)
that holds a descriptor of a named host file can open that file again through /proc/self/fd —
for writing too, past every read-only bind: the sandbox's root owns the store's images, so even
the tar proof, which keeps no capability, could rewrite the image it reads. vmim.process feeds
such a command through a pipe (copy_into, which fan_out's readers share) and popen() refuses
anything else (check_streams)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from typing import IO, Any, Dict, Optional, Sequence

from vmim.hashcopy import CHUNK, widen, write_all


def sandbox_argv(argv: Any) -> bool:
    """argv runs in the sandbox of guest data (vmim.sandbox.command: its SECCOMP_FD marks it)."""
    from vmim.sandbox import SECCOMP_FD

    return SECCOMP_FD in [str(a) for a in argv]


def host_file(f: Any) -> bool:
    """f (a descriptor or file object) is a host file that has a name (see the module): all
    but an anonymous pipe or socket and an unlinked regular file (a temporary file) — a named
    FIFO or a device node is one too (a block device reopened for writing)."""
    if f is None or isinstance(f, int) and f < 0:  # subprocess.PIPE, DEVNULL, STDOUT
        return False
    try:
        fd = f if isinstance(f, int) else f.fileno()
        st = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return False
    if stat.S_ISREG(st.st_mode):
        return st.st_nlink > 0
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        try:  # an anonymous one reads as "pipe:[N]" or "socket:[N]", a named FIFO as its path
            return os.readlink(f"/proc/self/fd/{fd}").startswith("/")
        except OSError:
            return True
    return True


def check_streams(kwargs: Dict[str, Any]) -> None:
    """ValueError (a bug) when a sandboxed command's Popen arguments hand it a host file."""
    for name in ("stdin", "stdout", "stderr"):
        if host_file(kwargs.get(name)):
            raise ValueError(f"a sandboxed command was given a host file as its {name}: it "
                             "could open it again for writing (/proc/self/fd); give it a pipe")


def copy_into(src: IO[bytes], stdins: Sequence[Optional[IO[bytes]]],
              failed: Sequence[BaseException] = ()) -> bool:
    """Copy src into every command's stdin (pipes) until it ends (True), or no one reads on,
    or a reader failed (failed is not empty): False. Every stdin is closed at the end.

    One reader is given the data by splice(2): the pages of the image go into its pipe
    without passing through this process (the copy through it cost 0.25-0.34 s of CPU for a
    596 MB image, against 0.07-0.10 s: a core the decompressor and tar then have; 2026-12-08).
    Several readers get it copied, through one page-aligned buffer (vmim.digest.of_open)."""
    open_ = [dst for dst in stdins if dst is not None]
    for f in [src, *open_]:
        widen(f)
    try:
        if len(open_) == 1:
            spliced = _splice_into(src, open_[0], failed)
            if spliced is not None:
                return spliced
        with mmap.mmap(-1, CHUNK) as buf, memoryview(buf) as view:
            while open_ and not failed:
                n = os.readv(src.fileno(), [view])
                if not n:
                    return True
                for dst in list(open_):
                    try:
                        write_all(dst.fileno(), view, n)
                    except (BrokenPipeError, ValueError):  # it stopped reading: its status says
                        open_.remove(dst)
        return False
    finally:
        for stdin in stdins:
            if stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    stdin.close()


def _splice_into(src: IO[bytes], dst: IO[bytes], failed: Sequence[BaseException]
                 ) -> Optional[bool]:
    """copy_into for one reader, by splice(2): None when it cannot splice from src (Python
    before 3.10, a filesystem without it) and nothing was moved yet."""
    splice = getattr(os, "splice", None)
    if splice is None:
        return None
    moved = False
    try:
        while not failed:
            try:
                n = splice(src.fileno(), dst.fileno(), CHUNK)
            except OSError as exc:
                if moved or exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                return None
            if not n:
                return True
            moved = True
        return False
    except (BrokenPipeError, ValueError):  # it stopped reading: its status says why
        return False
