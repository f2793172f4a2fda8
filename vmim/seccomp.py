"""The seccomp filter of the sandbox of guest data (vmim.sandbox).

Inside the sandbox run only programs that read and write files: tar, cpio, find, rsync, rm and
this package's own Python code. None of them mounts, makes namespaces, loads kernel modules or
BPF programs, traces processes, uses keyrings, sets the clock or pushes characters into a
terminal; those system calls are where a kernel bug or a mistake in our set-up would turn a
compromised unpacker into more. The filter denies them (a deny-list: everything else is
allowed) with EPERM, or ENOSYS for the newer families (the mount API, io_uring, clone3) so that
a program that probes them falls back as on an older kernel. bwrap loads it (`--seccomp FD`)
last, just before it runs the command: bwrap's own set-up is done by then.

The filter is built once per process with libseccomp's Python binding (Debian:
python3-seccomp, module `seccomp`; Fedora: python3-libseccomp; PyPI: pyseccomp) and kept in a
sealed memfd; each sandbox reads it from a descriptor of its own (fd()). Without the binding
nothing of guest data runs (exit 7), as without bubblewrap.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from vmim.errors import HostEnvironmentError

INSTALL_HINT = ("install libseccomp's Python binding (Debian/Ubuntu: apt-get install "
                "python3-seccomp; Fedora/RHEL: dnf install python3-libseccomp; pip: pyseccomp): "
                "vmimagemanager runs every program that reads or writes guest data under its "
                "seccomp filter")

#: ioctl requests that reach beyond the file: TIOCSTI pushes input into a terminal, TIOCLINUX
#: does as much on a Linux console, TIOCCONS (CAP_SYS_ADMIN) takes the system console's output;
#: FIFREEZE (CAP_SYS_ADMIN) stops every writer of a whole filesystem until FITHAW
TIOCSTI, TIOCLINUX, TIOCCONS = 0x5412, 0x541C, 0x541D
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
IOCTLS = {"TIOCSTI": TIOCSTI, "TIOCLINUX": TIOCLINUX, "TIOCCONS": TIOCCONS,
          "FIFREEZE": FIFREEZE, "FITHAW": FITHAW}
AF_UNIX = 1
#: the type byte of the ioctls of whole filesystems (FIFREEZE is _IOWR('X', 119, int))
FS_FAMILY = ord("X")
#: clone() flags that make a namespace (unshare(2) and setns(2) are denied whole; clone3, whose
#: flags libseccomp cannot see, is ENOSYS: glibc falls back to clone; CLONE_NEWTIME is not a
#: flag of clone(), whose low byte is the exit signal)
CLONE_NEW = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
             "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000,
             "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
             "CLONE_NEWNET": 0x40000000}

#: what libseccomp answers for a name it does not know (__NR_SCMP_ERROR)
UNKNOWN = -1
#: denied whole, with EPERM
DENY_EPERM = (
    # mounts and the root
    "mount", "umount", "umount2", "pivot_root", "chroot",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "iopl", "ioperm", "swapon", "swapoff", "reboot", "acct",
    "quotactl", "syslog", "lookup_dcookie", "uselib", "vhangup",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev",
    # keyrings
    "keyctl", "add_key", "request_key",
    # namespaces (bwrap made the sandbox's before loading the filter)
    "setns", "unshare",
    # files by handle: a handle names a file of the whole filesystem, past the binds
    "open_by_handle_at", "name_to_handle_at",
    # fanotify (CAP_SYS_ADMIN): a mark on a whole filesystem or mount reaches past the binds,
    # and each event carries a descriptor of the file the host opened, opened for the sandbox
    "fanotify_init", "fanotify_mark",
    "userfaultfd",
    # the clock
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)
#: denied whole, with ENOSYS: newer families a program may probe for and do without
DENY_ENOSYS = (
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "quotactl_fd", "io_uring_setup", "io_uring_enter", "io_uring_register", "clone3",
)


@dataclass(frozen=True)
class Rule:
    """One rule of the filter: syscall denied with errno, always (no `test`), or when its
    argument `test[0]` passes the comparison `test[1:]`: ("MASKED_EQ", mask, value) or
    ("NE", value, 0), libseccomp's names."""

    syscall: str
    errno: int
    test: Optional[Tuple[int, str, int, int]] = None
    why: str = ""


def rules() -> Tuple[Rule, ...]:
    """Every rule of the filter, in the order it is built."""
    out = [Rule(name, errno.EPERM) for name in DENY_EPERM]
    out += [Rule(name, errno.ENOSYS) for name in DENY_ENOSYS]
    out += [Rule("ioctl", errno.EPERM, (1, "MASKED_EQ", 0xFFFFFFFF, request), name)
            for name, request in IOCTLS.items()]
    # ... and the whole 'X' family, the ioctls on a filesystem rather than a file: besides
    # those two, FITRIM and the shutdown of a whole XFS or ext4 (0x8004587D), which needs
    # only CAP_SYS_ADMIN and works through a read-only bind. No tool in the sandbox uses one.
    out.append(Rule("ioctl", errno.EPERM, (1, "MASKED_EQ", 0xFF00, FS_FAMILY << 8),
                    "the filesystem family 'X'"))
    out += [Rule("clone", errno.EPERM, (0, "MASKED_EQ", flag, flag), name)
            for name, flag in CLONE_NEW.items()]
    # personality(2): only PER_LINUX (0), the default. libseccomp compares an argument once
    # per rule, so the query (0xffffffff) is refused too: no tool in the sandbox makes it.
    out.append(Rule("personality", errno.EPERM, (0, "NE", 0, 0), "other than PER_LINUX"))
    # sockets: AF_UNIX only (rsync's socketpair, a lookup through nscd). The network namespace
    # does not cover every family: AF_VSOCK reaches the host's virtual machines (their agents,
    # a guest's sshd on vsock) from any namespace, AF_ALG is kernel code no tool here needs
    out.append(Rule("socket", errno.EAFNOSUPPORT, (0, "NE", AF_UNIX, 0), "other than AF_UNIX"))
    return tuple(out)


def binding() -> Any:
    """libseccomp's Python module: Debian's `seccomp`, or PyPI's `pyseccomp` (the same API);
    HostEnvironmentError (exit 7) naming the package when neither is installed."""
    try:
        import seccomp as module  # type: ignore[import-not-found]
    except ImportError:
        try:
            import pyseccomp as module  # type: ignore[import-not-found,no-redef]
        except ImportError:
            raise HostEnvironmentError(f"libseccomp's Python binding (module 'seccomp') is "
                                       f"missing; {INSTALL_HINT}") from None
    return module


def _filter() -> Any:
    sc = binding()
    flt = sc.SyscallFilter(defaction=sc.ALLOW)
    for rule in rules():
        if sc.resolve_syscall(sc.Arch.NATIVE, rule.syscall) == UNKNOWN:
            # a name this libseccomp does not know yet (a call this architecture lacks, umount
            # on x86_64, has a negative pseudo-number, which add_rule() handles);
            # unit/test_seccomp.py requires every family of the task in the compiled filter
            continue
        if rule.test is None:
            flt.add_rule(sc.ERRNO(rule.errno), rule.syscall)
        else:
            index, op, a, b = rule.test
            flt.add_rule(sc.ERRNO(rule.errno), rule.syscall, sc.Arg(index, getattr(sc, op), a, b))
    return flt


def _export(method: str) -> bytes:
    with tempfile.TemporaryFile() as out:
        getattr(_filter(), method)(out)  # libseccomp writes to the descriptor itself
        out.seek(0)
        return out.read()


def build() -> bytes:
    """The BPF program of the filter, for this machine's architecture (a system call of
    another architecture kills the process: libseccomp's default)."""
    return _export("export_bpf")


def pseudo_code() -> str:
    """The filter as libseccomp shows it (PFC): what the BPF program does, readable."""
    return _export("export_pfc").decode()


_lock = threading.Lock()


@functools.cache
def _memfd() -> int:
    """A sealed memfd holding the filter, kept open for the life of this process."""
    program = build()
    fd = os.memfd_create("vmim-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, program)
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK |
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


def ensure() -> None:
    """Build the filter now (exit 7 when it cannot be): before any command is planned."""
    with _lock:
        _memfd()


def fd() -> int:
    """A new read-only descriptor of the filter, at its start (bwrap reads it to the end; each
    sandbox needs its own). Not inherited unless passed (pass_fds); the caller closes it."""
    with _lock:
        memfd = _memfd()
    return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
