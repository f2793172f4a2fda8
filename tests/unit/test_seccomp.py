"""vmim.seccomp: the filter of the sandbox of guest data, as libseccomp compiles it (the
filter at work, in a sandbox: tests/integration/test_sandbox.py)."""

from __future__ import annotations

import errno
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
}
#: what tar, cpio, rsync, rm and Python do all the time: never in the filter unconditionally
MUST_ALLOW = {"read", "write", "openat", "close", "fstat", "newfstatat", "getdents64", "mkdirat",
              "fchownat", "fchmodat", "utimensat", "setxattr", "lsetxattr", "fsetxattr",
              "mknodat", "renameat2", "unlinkat", "linkat", "symlinkat", "execve", "wait4",
              "fork", "vfork", "pipe2", "dup2", "lseek", "mmap", "getppid"}


def _compiled():
    """syscall name -> the actions the compiled filter takes for it, from libseccomp's own
    rendering of the program (PFC)."""
    out: dict = {}
    name = None
    for line in seccomp.pseudo_code().splitlines():
        m = re.search(r'# filter for syscall "([^"]+)"', line)
        if m:
            name = m.group(1)
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
    for name in ("fsopen", "move_mount", "mount_setattr", "io_uring_setup", "clone3"):
        assert compiled[name] == [f"ERRNO({errno.ENOSYS})"], name
    for name in ("mount", "unshare", "setns", "keyctl", "ptrace", "bpf", "init_module"):
        assert compiled[name] == [f"ERRNO({errno.EPERM})"], name


def test_what_the_tools_need_is_never_denied():
    assert not MUST_ALLOW & set(_compiled())


def test_ioctl_clone_and_personality_are_denied_only_for_their_arguments():
    rules = {(r.syscall, r.why): r for r in seccomp.rules()}
    assert rules[("ioctl", "TIOCSTI")].test == (1, "MASKED_EQ", 0xFFFFFFFF, 0x5412)
    assert rules[("ioctl", "TIOCLINUX")].test == (1, "MASKED_EQ", 0xFFFFFFFF, 0x541C)
    assert rules[("ioctl", "TIOCCONS")].test == (1, "MASKED_EQ", 0xFFFFFFFF, 0x541D)
    assert rules[("ioctl", "FIFREEZE")].test == (1, "MASKED_EQ", 0xFFFFFFFF, 0xC0045877)
    assert rules[("ioctl", "FITHAW")].test == (1, "MASKED_EQ", 0xFFFFFFFF, 0xC0045878)
    assert rules[("clone", "CLONE_NEWUSER")].test == (0, "MASKED_EQ", 0x10000000, 0x10000000)
    assert {w for s, w in rules if s == "clone"} == set(seccomp.CLONE_NEW)
    assert rules[("personality", "other than PER_LINUX")].test == (0, "NE", 0, 0)
    assert rules[("socket", "other than AF_UNIX")].test == (0, "NE", 1, 0)
    assert rules[("socket", "other than AF_UNIX")].errno == errno.EAFNOSUPPORT
    pfc = seccomp.pseudo_code()
    assert "== 21522" in pfc and "== 21532" in pfc  # TIOCSTI, TIOCLINUX compiled in
    assert "== 21533" in pfc and "== 3221510263" in pfc  # TIOCCONS, FIFREEZE
    assert pfc.count("action ALLOW;") == 1  # allowed by default: a deny-list


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


def test_every_ioctl_of_a_whole_filesystem_is_denied_not_only_freeze_and_thaw():
    """FITRIM and the shutdown of a whole XFS or ext4 (0x8004587D) are of the family 'X' as
    FIFREEZE is; a tool with CAP_SYS_ADMIN could take down the store it sees read-only."""
    family = [r for r in seccomp.rules() if r.syscall == "ioctl" and r.test and
              r.test[2] == 0xFF00]
    assert len(family) == 1 and family[0].errno == errno.EPERM
    _, _, mask, value = family[0].test
    for request in (0x8004587D, 0xC0185879, 0xC0045877, 0xC0045878):  # shutdown, FITRIM, ...
        assert request & mask == value, hex(request)
    for request in (0x5412, 0x80086601, 0x40049409):  # TIOCSTI, FS_IOC_GETFLAGS, FICLONE
        assert request & mask != value, hex(request)
    assert "$a1.lo32 & 0x0000ff00 == 22528" in seccomp.pseudo_code()  # compiled in
