"""What a sandboxed command is handed as its standard streams: pipes and unlinked temporary
files, never a host file that has a name. A command in the sandbox of guest data (vmim.sandbox)
that holds a descriptor of a named host file can open that file again through /proc/self/fd —
for writing too, past every read-only bind: the sandbox's root owns the store's images, so even
the tar proof, which keeps no capability, could rewrite the image it reads. vmim.process feeds
such a command through a pipe (copy_into) and popen() refuses anything else (check_streams)."""

from __future__ import annotations

import os
import stat
from typing import IO, Any, Dict


def sandbox_argv(argv: Any) -> bool:
    """argv runs in the sandbox of guest data (vmim.sandbox.command: its SECCOMP_FD marks it)."""
    from vmim.sandbox import SECCOMP_FD

    return SECCOMP_FD in [str(a) for a in argv]


def host_file(f: Any) -> bool:
    """f (a descriptor or file object) is a host file that has a name (see the module)."""
    if f is None or isinstance(f, int) and f < 0:  # subprocess.PIPE, DEVNULL, STDOUT
        return False
    try:
        st = os.fstat(f if isinstance(f, int) else f.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink > 0


def check_streams(kwargs: Dict[str, Any]) -> None:
    """ValueError (a bug) when a sandboxed command's Popen arguments hand it a host file."""
    for name in ("stdin", "stdout", "stderr"):
        if host_file(kwargs.get(name)):
            raise ValueError(f"a sandboxed command was given a host file as its {name}: it "
                             "could open it again for writing (/proc/self/fd); give it a pipe")


def copy_into(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy a file into a command's stdin (a pipe) until it ends or the command stops
    reading."""
    try:
        with dst:
            while True:
                chunk = os.read(src.fileno(), 1 << 20)
                if not chunk:
                    return
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst.fileno(), view):]
    except (BrokenPipeError, ValueError):  # it stopped reading: its status says why
        pass
