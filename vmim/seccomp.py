"""The seccomp filter of the sandbox of guest data (vmim.sandbox).

Inside the sandbox run only programs that read and write files: tar, cpio, find, rsync, rm and
this package's own Python code. Four of the capability sets they run with (READ_XATTRS,
UNPACK_XATTRS, COPY, MERGE) keep CAP_SYS_ADMIN, because the kernel asks for it to list, read
and write trusted.* xattrs; the capability grants much more. The filter is built from what it
grants (capabilities(7), and the kernel's capable(CAP_SYS_ADMIN) sites behind it), not from the
last escape: every system call, and every argument of a multiplexing call (ioctl, prctl,
madvise, fcntl), that is reachable only through CAP_SYS_ADMIN or another capability a set keeps
(CAP_SYS_RESOURCE, CAP_DAC_READ_SEARCH) and that no tool here needs is refused, with EPERM, or
ENOSYS for the newer families (the mount API, io_uring, clone3, listmount) so that a program
that probes them falls back as on an older kernel. docs/safety.md has the table: each grant of
CAP_SYS_ADMIN and how the sandbox answers it (this filter, a namespace, a read-only /proc, or
needed: the xattrs).

ioctl, the open-ended one (TIOCSTI, FIFREEZE, the whole 'X' family, the block, loop and
/dev/random requests, each driver's own), is an allow-list: only the requests the tools make
(found with strace -f over each tool's store and unpack: TCGETS for isatty()) and the few
that only ask about or flag a descriptor; any other request is EPERM. The other system calls
stay a deny-list. A whole allow-list was weighed and set aside: the calls a tool makes change
with glibc, Python and the tool's version (glibc 2.39 moved lchmod to fchmodat2, newer tars
will use setxattrat), libseccomp may not know a new call's name to allow it, and a call left
out fails a restore in the field, or silently drops a mode or an xattr; what CAP_SYS_ADMIN
reaches is a list the kernel documents and that grows slowly, and each addition is one line.

bwrap loads the filter (`--seccomp FD`) last, just before it runs the command: bwrap's own
set-up is done by then. It is built once per process with libseccomp's Python binding
(Debian: python3-seccomp, module `seccomp`; Fedora: python3-libseccomp; PyPI: pyseccomp) and
kept in a sealed memfd; each sandbox reads it from a descriptor of its own (fd()). Without the
binding nothing of guest data runs (exit 7), as without bubblewrap.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vmim.errors import HostEnvironmentError

INSTALL_HINT = ("install libseccomp's Python binding (Debian/Ubuntu: apt-get install "
                "python3-seccomp; Fedora/RHEL: dnf install python3-libseccomp; pip: pyseccomp): "
                "vmimagemanager runs every program that reads or writes guest data under its "
                "seccomp filter")

#: the only ioctl requests allowed: TCGETS (isatty(): every tool, Python on each open()) and
#: requests that only ask about or flag the caller's own descriptor: a terminal's size, the
#: bytes waiting in a pipe, non-blocking, close-on-exec (Python's os.set_inheritable raises on
#: any error of FIOCLEX but ENOTTY). The sandbox has no terminal: every terminal request is
#: refused anyway, so a terminal or driver request, whatever its family, is EPERM
IOCTLS_ALLOWED = {"TCGETS": 0x5401, "TIOCGWINSZ": 0x5413, "FIONREAD": 0x541B,
                  "FIONBIO": 0x5421, "FIONCLEX": 0x5450, "FIOCLEX": 0x5451}
AF_UNIX = 1
#: clone() flags that make a namespace (unshare(2) and setns(2) are denied whole; clone3, whose
#: flags libseccomp cannot see, is ENOSYS: glibc falls back to clone; CLONE_NEWTIME is not a
#: flag of clone(), whose low byte is the exit signal)
CLONE_NEW = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
             "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000,
             "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
             "CLONE_NEWNET": 0x40000000}
#: prctl options a kept capability opens: PR_SET_MM rewrites the process's memory map
#: (CAP_SYS_RESOURCE; its executable: CAP_SYS_ADMIN, checkpoint/restore); PR_SET_IO_FLUSHER
#: (CAP_SYS_RESOURCE) lets it dip into the kernel's memory reserves
PRCTL_DENIED = {"PR_SET_MM": 35, "PR_SET_IO_FLUSHER": 57}
#: madvise advice for CAP_SYS_ADMIN only: a physical page of the host marked poisoned or taken
#: offline, for good
MADVISE_DENIED = {"MADV_HWPOISON": 100, "MADV_SOFT_OFFLINE": 101}
#: fcntl commands: a pipe's buffer past /proc/sys/fs/pipe-max-size and the per-user pipe
#: limits (CAP_SYS_RESOURCE, CAP_SYS_ADMIN): unswappable kernel memory (the pipes between
#: stages are sized by vmimagemanager, outside)
FCNTL_DENIED = {"F_SETPIPE_SZ": 1031}
#: the 32 bits the kernel reads of an int or unsigned int argument (ioctl's request, prctl's
#: option, madvise's advice, fcntl's command): a rule on them cannot be passed by the upper 32
LOW32 = 0xFFFFFFFF

#: what libseccomp answers for a name it does not know (__NR_SCMP_ERROR)
UNKNOWN = -1
#: denied whole, with EPERM; by the capability that would let them through
DENY_EPERM = (
    # CAP_SYS_ADMIN: mounts and the root (CAP_SYS_CHROOT is never kept), the host's names
    # (the sandbox's uts namespace is its own: denied all the same, nothing names a host)
    "mount", "umount", "umount2", "pivot_root", "chroot", "sethostname", "setdomainname",
    # CAP_SYS_ADMIN: swap, quotas, the kernel log (CAP_SYSLOG), BPF (CAP_BPF), perf events
    # (CAP_PERFMON), dcookies; the real-time I/O class (no tool sets any: ioprio_set whole)
    "swapon", "swapoff", "quotactl", "syslog", "bpf", "perf_event_open", "lookup_dcookie",
    "ioprio_set",
    # CAP_SYS_ADMIN's obsolete calls, and others no tool makes (ustat names a host
    # filesystem by its device number, past the binds)
    "nfsservctl", "bdflush", "vm86", "vm86old", "uselib", "sysfs", "ustat", "_sysctl",
    # never kept, denied all the same: CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_SYS_RAWIO,
    # CAP_SYS_PACCT, CAP_SYS_TTY_CONFIG
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "iopl", "ioperm", "acct", "vhangup",
    # other processes (CAP_SYS_PTRACE; CAP_SYS_ADMIN: PTRACE_O_SUSPEND_SECCOMP; kcmp is
    # checkpoint/restore's): the sandbox's pid namespace holds only its own, denied all the same
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "process_madvise",
    # keyrings (CAP_SYS_ADMIN: KEYCTL_CHOWN, KEYCTL_SETPERM)
    "keyctl", "add_key", "request_key",
    # namespaces (CAP_SYS_ADMIN; bwrap made the sandbox's before loading the filter)
    "setns", "unshare",
    # files by handle (CAP_DAC_READ_SEARCH): a handle names a file of the whole filesystem,
    # past the binds
    "open_by_handle_at", "name_to_handle_at",
    # fanotify (CAP_SYS_ADMIN): a mark on a whole filesystem or mount reaches past the binds,
    # and each event carries a descriptor of the file the host opened, opened for the sandbox
    "fanotify_init", "fanotify_mark",
    "userfaultfd",
    # the clock (CAP_SYS_TIME, never kept)
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)
#: denied whole, with ENOSYS: newer families a program may probe for and do without; the
#: mount API (CAP_SYS_ADMIN), io_uring (its operations pass by this filter), clone3 (its flags
#: are out of a filter's sight), listmount/statmount (with CAP_SYS_ADMIN, the mounts of any
#: namespace: the host's whole mount table)
DENY_ENOSYS = (
    "move_mount", "open_tree", "open_tree_attr", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "quotactl_fd", "listmount", "statmount", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "clone3",
)
#: numbers of calls newer than some libseccomp (2.5.4 knows none of these), where new calls
#: share one number on every architecture but alpha, ia64 and mips (Linux 5.1 on)
NEWER = {"statmount": 457, "listmount": 458, "open_tree_attr": 467}
SHARED_NUMBERS = ("X86_64", "X86", "AARCH64", "ARM", "RISCV64", "PPC", "PPC64", "PPC64LE",
                  "S390", "S390X")


@dataclass(frozen=True)
class Rule:
    """One rule of the filter: syscall denied with errno, always (no `test`), or when its
    argument `test[0]` passes the comparison `test[1:]`: ("MASKED_EQ", mask, value),
    ("NE", value, 0), ("LT", value, 0) or ("GT", value, 0), libseccomp's names."""

    syscall: str
    errno: int
    test: Optional[Tuple[int, str, int, int]] = None
    why: str = ""


def outside(allowed: Sequence[int], bits: int = 32) -> List[Tuple[str, int, int]]:
    """Comparisons whose union is every value but `allowed` (libseccomp compares an argument
    once per rule, so "none of these" is spelt as the values below the least, above the
    greatest, and between them each run of bits that holds no allowed value:
    ("LT", least, 0), ("GT", greatest, 0), ("MASKED_EQ", mask, prefix)...). The LT and GT
    compare the whole 64-bit argument: one with upper bits set is outside."""
    values = sorted(set(allowed))
    low, high = values[0], values[-1]
    out: List[Tuple[str, int, int]] = [("LT", low, 0), ("GT", high, 0)]

    def split(prefix: int, depth: int, inside: List[int]) -> None:
        first = prefix << (bits - depth)
        last = first + (1 << (bits - depth)) - 1
        if last < low or first > high:
            return  # below the least or above the greatest: LT, GT
        if not inside:
            out.append(("MASKED_EQ", ((1 << depth) - 1) << (bits - depth), first))
        elif depth < bits:
            bit = bits - depth - 1
            split(prefix << 1, depth + 1, [v for v in inside if not v >> bit & 1])
            split(prefix << 1 | 1, depth + 1, [v for v in inside if v >> bit & 1])

    split(0, 0, values)
    return out


def _equal(index: int, values: Dict[str, int], syscall: str) -> List[Rule]:
    return [Rule(syscall, errno.EPERM, (index, "MASKED_EQ", LOW32, value), name)
            for name, value in values.items()]


def rules() -> Tuple[Rule, ...]:
    """Every rule of the filter, in the order it is built."""
    out = [Rule(name, errno.EPERM) for name in DENY_EPERM]
    out += [Rule(name, errno.ENOSYS) for name in DENY_ENOSYS]
    # ioctl: every request but IOCTLS_ALLOWED (the kernel reads the low 32 bits of it)
    out += [Rule("ioctl", errno.EPERM, (1, op, a, b), "not allowed")
            for op, a, b in outside(list(IOCTLS_ALLOWED.values()))]
    out += [Rule("clone", errno.EPERM, (0, "MASKED_EQ", flag, flag), name)
            for name, flag in CLONE_NEW.items()]
    # personality(2): only PER_LINUX (0), the default. libseccomp compares an argument once
    # per rule, so the query (0xffffffff) is refused too: no tool in the sandbox makes it.
    out.append(Rule("personality", errno.EPERM, (0, "NE", 0, 0), "other than PER_LINUX"))
    # sockets: AF_UNIX only (rsync's socketpair, a lookup through nscd). The network namespace
    # does not cover every family: AF_VSOCK reaches the host's virtual machines (their agents,
    # a guest's sshd on vsock) from any namespace, AF_ALG is kernel code no tool here needs
    out.append(Rule("socket", errno.EAFNOSUPPORT, (0, "NE", AF_UNIX, 0), "other than AF_UNIX"))
    out += _equal(0, PRCTL_DENIED, "prctl")
    out += _equal(2, MADVISE_DENIED, "madvise")
    out += _equal(1, FCNTL_DENIED, "fcntl") + _equal(1, FCNTL_DENIED, "fcntl64")
    return tuple(out)


def syscall_number(sc: Any, name: str) -> int:
    """The number of a system call on this architecture; UNKNOWN when neither libseccomp nor
    NEWER knows it here."""
    number = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    # an architecture's token is unsigned in one binding (pyseccomp), signed in the other
    shared = {int(getattr(sc.Arch, arch)) & LOW32 for arch in SHARED_NUMBERS
              if hasattr(sc.Arch, arch)}
    if number == UNKNOWN and name in NEWER and int(sc.system_arch()) & LOW32 in shared:
        return NEWER[name]
    return number


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
        number = syscall_number(sc, rule.syscall)
        if number == UNKNOWN:
            # a name this libseccomp does not know yet (a call this architecture lacks, umount
            # on x86_64, has a negative pseudo-number, which add_rule() handles);
            # unit/test_seccomp.py requires every family of the task in the compiled filter
            continue
        if rule.test is None:
            flt.add_rule(sc.ERRNO(rule.errno), number)
        else:
            index, op, a, b = rule.test
            flt.add_rule(sc.ERRNO(rule.errno), number, sc.Arg(index, getattr(sc, op), a, b))
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
