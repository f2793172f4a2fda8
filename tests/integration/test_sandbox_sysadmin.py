"""What CAP_SYS_ADMIN grants, from inside the sandbox (vmim.seccomp, docs/safety.md).

The sets that carry trusted.* xattrs keep CAP_SYS_ADMIN. Escapes went through it one instance
at a time (fanotify, then the ioctl family 'X'); the filter now answers the capability's whole
list (capabilities(7)). Each attempt must now be refused by the filter, with every set that
keeps CAP_SYS_ADMIN. In the sandbox of the main of 2026-12-06, 21 of the 25 reached the kernel
(they succeeded, or failed with another error than EPERM: ENOTTY, ENOSYS, EINVAL, EFAULT);
FITRIM and TIOCSTI were refused already, and PR_SET_MM and PR_SET_IO_FLUSHER by the kernel of
a machine whose bounding set lacks CAP_SYS_RESOURCE (the test machine's). None of them harms
the host when it does get through: the host name is the sandbox's own uts namespace's, the
I/O class its own process's, the poisoned page an address that is not mapped.
"""

from __future__ import annotations

import pytest

from tests.integration.test_sandbox import _ATTEMPTS, _inside
from vmim import sandbox, seccomp

#: the sets that keep CAP_SYS_ADMIN
SYS_ADMIN_SETS = [name for name, caps in sandbox.SETS.items() if "CAP_SYS_ADMIN" in caps]

_PROGRAM = _ATTEMPTS + """
import fcntl, mmap, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(fn, *args):
    def go():
        if fn(*args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return go
def sys_(name, *args):
    return call(libc.syscall, NR[name], *args)
NR = NUMBERS
me = os.getpid()
pidfd = os.pidfd_open(me)
r, w = os.pipe()
null = os.open("/dev/null", os.O_RDONLY)
urandom = os.open("/dev/urandom", os.O_RDONLY)
open("/tmp/f", "w").close()
tmpfile = os.open("/tmp/f", os.O_RDONLY)
tmpdir = os.open("/tmp", os.O_RDONLY)
mntns = os.open("/proc/self/ns/mnt", os.O_RDONLY)
ustat = ctypes.create_string_buffer(64)
def ioctl(fd, request, arg=0):
    return lambda: fcntl.ioctl(fd, request, arg)
# denied whole
attempt("sethostname", call(libc.sethostname, b"sandbox", 7))
attempt("setdomainname", call(libc.setdomainname, b"sandbox", 7))
attempt("ioprio_set", sys_("ioprio_set", 1, 0, 1 << 13 | 4))  # its own, real-time class
attempt("kcmp", sys_("kcmp", me, me, 0, 0, 0))
attempt("pidfd_getfd", sys_("pidfd_getfd", pidfd, 0, 0))
attempt("process_madvise", sys_("process_madvise", pidfd, None, 0, 20, 0))
attempt("sysfs", sys_("sysfs", 3))
attempt("ustat", sys_("ustat", os.stat("/tmp").st_dev, ustat))
attempt("nfsservctl", sys_("nfsservctl", 0, None, None))
attempt("_sysctl", sys_("_sysctl", None))
# by argument
attempt("MADV_HWPOISON", sys_("madvise", 0x10000, 4096, 100))  # not mapped: EFAULT
attempt("MADV_SOFT_OFFLINE", sys_("madvise", 0x10000, 4096, 101))
attempt("PR_SET_MM", sys_("prctl", 35, 1, 0, 0, 0))  # start_code 0: EINVAL
attempt("PR_SET_IO_FLUSHER", sys_("prctl", 57, 1, 0, 0, 0))
attempt("F_SETPIPE_SZ", lambda: fcntl.fcntl(w, 1031, 1 << 20))
attempt("RNDADDTOENTCNT", ioctl(urandom, 0x40045201, struct.pack("i", 0)))
attempt("NS_GET_USERNS", ioctl(mntns, 0xB701))
attempt("FS_IOC_GETFLAGS", ioctl(tmpfile, 0x80086601, bytes(8)))
attempt("BLKFLSBUF", ioctl(tmpfile, 0x1261))
attempt("LOOP_CTL_GET_FREE", ioctl(null, 0x4C82))
attempt("FITRIM", ioctl(tmpdir, 0xC0185879, bytes(24)))
attempt("TIOCSTI", ioctl(null, 0x5412, b"x"))
attempt("openpty", os.openpty)
# the newer families
attempt("statmount", sys_("statmount", None, None, 0, 0))
attempt("listmount", sys_("listmount", None, None, 0, 0))
# what the tools do, allowed
attempt("FIONREAD", ioctl(w, 0x541B, bytes(4)))
attempt("FIOCLEX", lambda: os.set_inheritable(w, False))
attempt("TCGETS", ioctl(null, 0x5401, bytes(60)))
attempt("F_GETPIPE_SZ", lambda: fcntl.fcntl(w, 1032))
attempt("PR_SET_NAME", call(libc.prctl, 15, b"tar", 0, 0, 0))
attempt("MADV_DONTNEED", lambda: mmap.mmap(-1, 4096).madvise(mmap.MADV_DONTNEED))
"""

DENIED = ["sethostname", "setdomainname", "ioprio_set", "kcmp", "pidfd_getfd",
          "process_madvise", "sysfs", "ustat", "nfsservctl", "_sysctl", "MADV_HWPOISON",
          "MADV_SOFT_OFFLINE", "PR_SET_MM", "PR_SET_IO_FLUSHER", "F_SETPIPE_SZ",
          "RNDADDTOENTCNT", "NS_GET_USERNS", "FS_IOC_GETFLAGS", "BLKFLSBUF",
          "LOOP_CTL_GET_FREE", "FITRIM", "TIOCSTI", "openpty"]


def _numbers():
    sc = seccomp.binding()
    names = ("ioprio_set", "kcmp", "pidfd_getfd", "process_madvise", "sysfs", "ustat",
             "nfsservctl", "_sysctl", "madvise", "prctl", "statmount", "listmount")
    return {name: seccomp.syscall_number(sc, name) for name in names}


@pytest.mark.parametrize("caps", SYS_ADMIN_SETS)
def test_what_cap_sys_admin_grants_beyond_xattrs_is_refused_in_the_sandbox(caps):
    numbers = _numbers()
    if any(n < 0 for n in numbers.values()):
        pytest.skip(f"an architecture without one of these calls: {numbers}")
    got = _inside(_PROGRAM.replace("NUMBERS", repr(numbers)), sandbox.SETS[caps])
    assert got == [*(f"{name}=EPERM" for name in DENIED),
                   "statmount=ENOSYS", "listmount=ENOSYS",
                   "FIONREAD=OK", "FIOCLEX=OK", "TCGETS=ENOTTY", "F_GETPIPE_SZ=OK",
                   "PR_SET_NAME=OK", "MADV_DONTNEED=OK"]


def test_the_sets_that_keep_cap_sys_admin_are_those_that_carry_trusted_xattrs():
    assert sorted(SYS_ADMIN_SETS) == ["COPY", "MERGE", "READ_XATTRS", "UNPACK_XATTRS"]
