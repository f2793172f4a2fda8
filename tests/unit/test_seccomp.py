"""vmim.seccomp: the filter of the sandbox of guest data, as libseccomp compiles it (the
filter at work, in a sandbox: tests/integration/test_sandbox.py)."""

from __future__ import annotations

import errno
import random
import re
import sys

import pytest

from vmim import seccomp

#: the families the sandbox must never reach (the task's list)
MUST_DENY = {
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "bpf", "perf_event_open", "ptrace", "process_vm_readv",
    "process_vm_writev", "keyctl", "add_key", "request_key", "setns", "unshare",
    "open_by_handle_at", "name_to_handle_at", "userfaultfd", "iopl", "ioperm", "swapon",
    "swapoff", "reboot", "settimeofday", "clock_settime", "adjtimex", "acct", "quotactl",
    "syslog", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "fanotify_init", "fanotify_mark",
    # the rest of what CAP_SYS_ADMIN grants (capabilities(7)), and its neighbours
    "sethostname", "setdomainname", "ioprio_set", "nfsservctl", "sysfs", "ustat", "_sysctl",
    "kcmp", "pidfd_getfd", "process_madvise", "quotactl_fd", "listmount", "statmount",
    "open_tree_attr", "clock_adjtime", "lookup_dcookie", "uselib", "vhangup", "chroot",
}
#: what tar, cpio, rsync, rm and Python do all the time: never in the filter unconditionally
MUST_ALLOW = {"read", "write", "openat", "close", "fstat", "newfstatat", "getdents64", "mkdirat",
              "fchownat", "fchmodat", "utimensat", "setxattr", "lsetxattr", "fsetxattr",
              "mknodat", "renameat2", "unlinkat", "linkat", "symlinkat", "execve", "wait4",
              "fork", "vfork", "pipe2", "dup2", "lseek", "mmap", "getppid", "fchmodat2",
              "statx", "getxattr", "lgetxattr", "listxattr", "llistxattr", "fsync", "rseq"}


def _compiled():
    """syscall name -> the actions the compiled filter takes for it, from libseccomp's own
    rendering of the program (PFC)."""
    out: dict = {}
    name = None
    newer = {number: call for call, number in seccomp.NEWER.items()}
    for line in seccomp.pseudo_code().splitlines():
        m = re.search(r'# filter for syscall "([^"]+)" \((\d+)\)', line)
        if m:  # a call this libseccomp does not know is "UNKNOWN" (its number)
            name = m.group(1) if m.group(1) != "UNKNOWN" else newer[int(m.group(2))]
            out[name] = []
        m = re.search(r"action (\w+\(\d+\)|\w+);", line)
        if m and name is not None:
            out[name].append(m.group(1))
    return out


def test_every_dangerous_family_is_denied_in_the_compiled_filter():
    compiled = _compiled()
    missing = sorted(MUST_DENY - set(compiled))
    assert missing == []
    for name in MUST_DENY:
        assert compiled[name] and all(a.startswith("ERRNO(") for a in compiled[name]), name


def test_newer_families_answer_enosys_older_ones_eperm():
    compiled = _compiled()
    for name in ("fsopen", "move_mount", "mount_setattr", "io_uring_setup", "clone3",
                 "listmount", "statmount", "open_tree_attr"):
        assert compiled[name] == [f"ERRNO({errno.ENOSYS})"], name
    for name in ("mount", "unshare", "setns", "keyctl", "ptrace", "bpf", "init_module",
                 "sethostname", "ioprio_set", "kcmp", "pidfd_getfd"):
        assert compiled[name] == [f"ERRNO({errno.EPERM})"], name


def test_what_the_tools_need_is_never_denied():
    assert not MUST_ALLOW & set(_compiled())


_OPS = {"MASKED_EQ": lambda x, a, b: x & a == b, "NE": lambda x, a, b: x != a,
        "LT": lambda x, a, b: x < a, "GT": lambda x, a, b: x > a}


def _denied(syscall, *args, rules=None):
    """Whether the rules deny syscall called with args, as libseccomp compares (each rule's
    one comparison on the 64-bit argument; the rules of a call are or-ed)."""
    return any(r.test is None or _OPS[r.test[1]](args[r.test[0]], *r.test[2:])
               for r in (rules or seccomp.rules()) if r.syscall == syscall)


#: ioctl requests of every family a kept CAP_SYS_ADMIN reaches (or that acts past the file)
IOCTLS_DENIED = {
    "TIOCSTI": 0x5412, "TIOCLINUX": 0x541C, "TIOCCONS": 0x541D, "TIOCSETD": 0x5423,
    "TIOCGPTN": 0x80045430, "FIFREEZE": 0xC0045877, "FITHAW": 0xC0045878, "FITRIM": 0xC0185879,
    "XFS_IOC_GOINGDOWN": 0x8004587D, "FS_IOC_FSSETXATTR": 0x401C5820, "BLKFLSBUF": 0x1261,
    "BLKROSET": 0x125D, "BLKDISCARD": 0x1277, "BLKRRPART": 0x125F, "BLKGETSIZE64": 0x80081272,
    "LOOP_SET_FD": 0x4C00, "LOOP_CTL_GET_FREE": 0x4C82, "RNDADDTOENTCNT": 0x40045201,
    "RNDCLEARPOOL": 0x5206, "FS_IOC_SETFSLABEL": 0x41009432, "EXT4_IOC_SETFSUUID": 0x4008662C,
    "FS_IOC_SETFLAGS": 0x40086602, "FICLONE": 0x40049409, "BTRFS_IOC_RESIZE": 0x50009403,
    "NS_GET_USERNS": 0xB701, "PIDFD_GET_MNT_NAMESPACE": 0xFF03, "FIBMAP": 0x1,
}


def test_ioctl_is_an_allow_list_every_other_request_of_every_family_is_denied():
    """The 'X' family after FIFREEZE, TIOCCONS after TIOCSTI: each escape went through one
    more request. Now only TCGETS and the requests on the caller's own descriptor pass."""
    for name, request in seccomp.IOCTLS_ALLOWED.items():
        assert not _denied("ioctl", 3, request, 0), name
        assert _denied("ioctl", 3, request | 1 << 32, 0), name  # upper bits: outside
    for name, request in IOCTLS_DENIED.items():
        assert _denied("ioctl", 3, request, 0), name
    allowed = set(seccomp.IOCTLS_ALLOWED.values())
    rules = [r for r in seccomp.rules() if r.syscall == "ioctl"]
    rng = random.Random(7)
    for request in [*range(0x10000), *(rng.getrandbits(32) for _ in range(20000)),
                    0xFFFFFFFF, 0x80000000, 1 << 63]:
        assert _denied("ioctl", 3, request, 0, rules=rules) is (request not in allowed), \
            hex(request)
    assert {r.errno for r in rules} == {errno.EPERM} and len(rules) < 40
    pfc = seccomp.pseudo_code()
    assert "$a1.lo32 > 21585" in pfc and "$a1.lo32 >= 21505" in pfc  # FIOCLEX, TCGETS
    assert "$a1.lo32 & 0xffffffff == 21522" in pfc  # TIOCSTI, compiled in


def test_prctl_madvise_fcntl_are_denied_only_for_what_a_kept_capability_opens():
    assert _denied("prctl", 35, 1, 0) and _denied("prctl", 57, 1, 0)  # PR_SET_MM, IO_FLUSHER
    assert _denied("prctl", 35 | 1 << 32, 1, 0)  # the kernel reads an int
    assert not _denied("prctl", 15, 0, 0) and not _denied("prctl", 38, 1, 0)  # NAME, NNP
    assert _denied("madvise", 0, 4096, 100) and _denied("madvise", 0, 4096, 101)
    assert not any(_denied("madvise", 0, 4096, a) for a in (4, 8, 14, 20, 21))  # DONTNEED..
    assert _denied("fcntl", 3, 1031, 1 << 20)  # F_SETPIPE_SZ
    assert not any(_denied("fcntl", 3, c, 0) for c in (1, 2, 3, 4, 1030, 1032, 1033))
    pfc = seccomp.pseudo_code()
    for text in ("$a0.lo32 & 0xffffffff == 35", "$a2.lo32 & 0xffffffff == 100",
                 "$a1.lo32 & 0xffffffff == 1031"):
        assert text in pfc


def test_clone_personality_and_socket_are_denied_only_for_their_arguments():
    rules = {(r.syscall, r.why): r for r in seccomp.rules()}
    assert rules[("clone", "CLONE_NEWUSER")].test == (0, "MASKED_EQ", 0x10000000, 0x10000000)
    assert {w for s, w in rules if s == "clone"} == set(seccomp.CLONE_NEW)
    assert rules[("personality", "other than PER_LINUX")].test == (0, "NE", 0, 0)
    assert rules[("socket", "other than AF_UNIX")].test == (0, "NE", 1, 0)
    assert rules[("socket", "other than AF_UNIX")].errno == errno.EAFNOSUPPORT
    assert seccomp.pseudo_code().count("action ALLOW;") == 1  # allowed by default: a deny-list


def test_the_program_is_whole_bpf_instructions_and_each_descriptor_reads_it_from_its_start():
    program = seccomp.build()
    assert program and len(program) % 8 == 0  # struct sock_filter: 8 bytes each
    for _ in range(2):  # bwrap reads its descriptor to the end: a second one starts again
        fd = seccomp.fd()
        try:
            with open(fd, "rb", closefd=False) as fh:
                assert fh.read() == program
        finally:
            import os

            os.close(fd)


def test_without_the_binding_nothing_runs_exit_7(monkeypatch):
    from vmim import sandbox
    from vmim.errors import EXIT_ENVIRONMENT, HostEnvironmentError

    monkeypatch.setitem(sys.modules, "seccomp", None)  # as if neither were installed
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    monkeypatch.setattr(sandbox, "_bwrap", lambda: "/usr/bin/bwrap")
    seccomp._memfd.cache_clear()
    try:
        with pytest.raises(HostEnvironmentError) as info:
            sandbox.command(["tar", "--version"], [], caps=sandbox.NONE)
    finally:
        seccomp._memfd.cache_clear()
    assert info.value.exit_code == EXIT_ENVIRONMENT
    assert "python3-seccomp" in str(info.value) and "pyseccomp" in str(info.value)


def test_a_call_newer_than_libseccomp_is_denied_by_number_with_either_binding():
    """libseccomp 2.5.4 knows no listmount: its number is used where new calls share one.
    Debian's binding gives architecture tokens signed, pyseccomp unsigned: both are found."""

    class Binding:  # as Debian's python3-seccomp answers on x86_64
        class Arch:
            NATIVE, X86_64, MIPS = 0, -1073741762, 8

        @staticmethod
        def resolve_syscall(arch, name):
            return -1

        @staticmethod
        def system_arch():
            return 3221225534

    assert seccomp.syscall_number(Binding, "listmount") == 458
    assert seccomp.syscall_number(Binding, "statmount") == 457
    Binding.system_arch = staticmethod(lambda: 8)  # mips: new calls numbered otherwise
    assert seccomp.syscall_number(Binding, "listmount") == seccomp.UNKNOWN
