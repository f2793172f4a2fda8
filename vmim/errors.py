"""Exception classes; each carries the exit code the command line turns it into (design §8)."""

from __future__ import annotations

import errno
import shlex
from typing import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_STATE = 4
EXIT_LOCKED = 5
EXIT_COMMAND = 6
EXIT_ENVIRONMENT = 7
EXIT_CLEANUP = 8
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def quote_argv(argv: Sequence[str]) -> str:
    """A command as a shell would show it (for messages and logs; never run through a shell)."""
    return " ".join(shlex.quote(str(a)) for a in argv)


class VmimError(Exception):
    """Base class: an expected failure with a one-line message and an exit code."""

    exit_code = EXIT_FAILED


class OperationError(VmimError):
    """An operation failed (exit 1)."""


class UsageError(VmimError):
    """The command line is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class ProtocolError(UsageError):
    """A value that crossed a process boundary (a fleet message, a job's request) is not one
    the receiver accepts: unknown field, wrong type, out of range (exit 2)."""


class ConfigError(VmimError):
    """The configuration is invalid; carries every problem found (exit 3)."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: Sequence[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StateError(VmimError):
    """Unknown box or image, domain running, disk busy (exit 4)."""

    exit_code = EXIT_STATE


class LockBusyError(VmimError):
    """The slot is locked by another command (exit 5, retryable)."""

    exit_code = EXIT_LOCKED


class CommandError(VmimError):
    """An external command failed (exit 6)."""

    exit_code = EXIT_COMMAND

    def __init__(self, argv: Sequence[str], returncode: int, stderr_tail: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = " ".join(stderr_tail.split())
        msg = f"command failed with exit code {returncode}: {quote_argv(argv)}"
        if self.stderr_tail:
            msg += f": {self.stderr_tail}"
        super().__init__(msg)


class OutputWriteError(CommandError):
    """A command's output could not be written where it goes (a full disk): exit 6 as when the
    command itself writes it."""

    def __init__(self, argv: Sequence[str], path: str, reason: str):
        VmimError.__init__(self, f"cannot write the output of {quote_argv(argv)} to {path}: "
                                 f"{reason}")
        self.argv = list(argv)
        self.returncode = -1
        self.stderr_tail = reason


class HostEnvironmentError(VmimError):
    """Something the host lacks: a tool, root, a reachable libvirtd (exit 7)."""

    exit_code = EXIT_ENVIRONMENT


#: The Debian package of each program vmimagemanager runs (tools/setup-host installs them:
#: tests/unit/test_process.py holds the two lists together).
DEBIAN_PACKAGES = {
    "rsync": "rsync", "tar": "tar", "cpio": "cpio", "gzip": "gzip", "pigz": "pigz", "igzip": "isal",
    "bzip2": "bzip2", "lbzip2": "lbzip2", "zstd": "zstd", "xz": "xz-utils",
    "qemu-img": "qemu-utils", "qemu-storage-daemon": "qemu-system-common",
    "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "mkfs.ext3": "e2fsprogs",
    "mkfs.ext2": "e2fsprogs", "mke2fs": "e2fsprogs", "dumpe2fs": "e2fsprogs",
    "tune2fs": "e2fsprogs", "debugfs": "e2fsprogs", "mkfs.xfs": "xfsprogs",
    "xfs_db": "xfsprogs", "xfs_info": "xfsprogs", "kpartx": "kpartx",
    "bwrap": "bubblewrap", "losetup": "mount", "mount": "mount", "umount": "mount",
    "blkid": "util-linux", "setpriv": "util-linux",
}


class ToolMissingError(HostEnvironmentError):
    """An external program is not installed."""

    def __init__(self, tool: str, hint: str = ""):
        self.tool = tool
        msg = f"required program '{tool}' was not found on PATH"
        package = DEBIAN_PACKAGES.get(tool.rsplit("/", 1)[-1])
        if package:  # also with a hint: the hint says why, the package what to install
            msg += f"; install it (Debian: apt install {package})"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class CleanupError(VmimError):
    """Something was left mounted or mapped (exit 8); the message says how to release it."""

    exit_code = EXIT_CLEANUP


def full_disk(exc: OSError) -> bool:
    """Whether exc is a full disk (or quota): it exits 6, as when GNU tar or rsync meets
    it, whatever wrote (the newc extractor in the sandbox, this process)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class IncompleteError(VmimError):
    """A step failed after it began rewriting the slot's filesystem (exit code of the cause)."""

    def __init__(self, what: str, cause: VmimError):
        self.exit_code = cause.exit_code
        super().__init__(f"{what}: {cause}; the slot's filesystem is now incomplete and marked "
                         "so (-u refuses to start it): restore an image")


class Interrupted(VmimError):
    """SIGINT or SIGTERM arrived (exit 130 or 143)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
