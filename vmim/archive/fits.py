"""Whether an unpack fits the kernel and the filesystem it writes into: what a proof that reads
only the archive cannot see, and the unpack meets after the slot was cleared.

An archive that GNU tar (or the newc reader) reads without a word can still be refused by
the system calls of its unpack. These are the refusals a well-formed archive can provoke, by
system call, and where each is proven before the slot is touched:

- a name (open, mkdir, symlink, link, mknod): ENAMETOOLONG for a component longer than the
  filesystem's NAME_MAX: `check` (statvfs f_namemax); and, GNU tar, which passes the whole
  name, for a name longer than PATH_MAX - 1: the tar proof (`PATH_MAX`; the newc reader walks
  a name one directory at a time).
- symlink: ENAMETOOLONG for a target longer than PATH_MAX - 1 (the proofs: `symlink_ok`), or
  than the filesystem keeps (ext2/3/4: a block less one byte; xfs: 1024): `check`.
- mknod: EINVAL (glibc) for a major above 4095 or a minor above 2^20 - 1: the proofs
  (`device_ok`).
- link: EMLINK for more names of one inode than the filesystem's LINK_MAX (ext4: 65000):
  `check` (pathconf).
- open, mkdir, mknod, symlink: ENOSPC with no inode left (ext2/3/4 have a fixed number):
  `check` (statvfs f_files).
- write, lseek: ENOSPC with no block left: vmim.steps.data (the image's data against the
  filesystem's size).
- ftruncate, write: EFBIG for a file larger than the filesystem's largest (ext2/3/4: 2^32
  blocks): `check`.

The rest of what the unpack does cannot fail on a well-formed archive: fchown of ids GNU tar
reads (the proof refuses one it cannot), fchmod, utimensat (GNU tar only warns), setxattr
(warned and dropped: tests/integration/test_acls.py). xfs makes inodes as it needs them, so
its inodes are bounded by its space; ext2/ext3 without dir_nlink also limit a directory to
32000 subdirectories, which is not checked.
"""

from __future__ import annotations

import os
from typing import Optional

from vmim.archive import Summary, UnsafeMember
from vmim.errors import StateError

#: what a name passed whole to a system call may hold, less its terminating NUL
PATH_MAX = 4095
#: the kernel's dev_t as glibc's mknod passes it: 12 bits of major, 20 of minor
MAJOR_MAX = (1 << 12) - 1
MINOR_MAX = (1 << 20) - 1
#: inodes a restore makes beside the image's: the staging directory it unpacks into
STAGING_INODES = 1
#: inodes an empty ext2/3/4 uses: the reserved ones (1-10) and lost+found
EXT_RESERVED_INODES = 11
EXT = ("ext2", "ext3", "ext4")


def device_ok(what: str, name: str, major: int, minor: int) -> None:
    """UnsafeMember when mknod cannot make this device number."""
    if not (0 <= major <= MAJOR_MAX and 0 <= minor <= MINOR_MAX):
        raise UnsafeMember(f"{what} {name!r} is a device {major},{minor}, which Linux cannot "
                           f"make (majors up to {MAJOR_MAX}, minors up to {MINOR_MAX})")


def name_ok(what: str, name: str, length: int, who: str) -> None:
    """UnsafeMember when a name of length bytes, passed whole to a system call (by `who`:
    "GNU tar cannot unpack", "cpio cannot archive"), is longer than PATH_MAX takes."""
    if length > PATH_MAX:
        raise UnsafeMember(f"{what} {name[:60]!r}... is {length} bytes long: {who} a name "
                           f"longer than {PATH_MAX} bytes")


def symlink_ok(what: str, name: str, target_bytes: int) -> None:
    """UnsafeMember when no Linux filesystem takes a symlink target this long."""
    if target_bytes > PATH_MAX:
        raise UnsafeMember(f"{what} {name!r} is a symlink to a target of {target_bytes} bytes: "
                           f"Linux takes {PATH_MAX} at most")


def _symlink_max(fstype: str, block_size: int) -> int:
    if fstype in EXT:
        return min(PATH_MAX, block_size - 1)
    if fstype == "xfs":
        return 1024  # XFS_SYMLINK_MAXLEN
    return PATH_MAX


def _largest_file(fstype: str, block_size: int) -> Optional[int]:
    if fstype in EXT:
        return ((1 << 32) - 1) * block_size  # 32-bit logical block numbers
    return None


def check(root: str, fstype: str, summary: Optional[Summary], name: str) -> None:
    """StateError (exit 4, the slot untouched) when the image read to its end (summary) cannot
    be unpacked into the filesystem at root, of type fstype, once it is cleared."""
    if summary is None:
        return
    vfs = os.statvfs(root)
    problems = []
    if summary.longest_component > vfs.f_namemax:
        problems.append(f"a name of {summary.longest_component} bytes (the filesystem takes "
                        f"{vfs.f_namemax})")
    limit = _symlink_max(fstype, vfs.f_bsize)
    if summary.longest_symlink > limit:
        problems.append(f"a symlink to a target of {summary.longest_symlink} bytes ({fstype} "
                        f"keeps {limit})")
    links = os.pathconf(root, "PC_LINK_MAX")
    if summary.most_links > links:
        problems.append(f"{summary.most_links} names of one file ({fstype} takes {links})")
    # the restore's staging directory takes one inode more (the archive's root is unpacked
    # into it): a tree that uses every inode of its filesystem cannot be restored into one of
    # the same size
    if fstype in EXT and summary.inodes + STAGING_INODES > vfs.f_files - EXT_RESERVED_INODES:
        problems.append(f"{summary.inodes} files and directories and the restore's staging "
                        f"directory (the filesystem has {vfs.f_files - EXT_RESERVED_INODES} "
                        "inodes for them)")
    largest = _largest_file(fstype, vfs.f_bsize)
    if largest is not None and summary.largest_file > largest:
        problems.append(f"a file of {summary.largest_file} bytes ({fstype} with blocks of "
                        f"{vfs.f_bsize} takes {largest})")
    if problems:
        raise StateError(f"image '{name}' cannot be unpacked into this slot's {fstype}: it holds "
                         + "; ".join(problems) + "; the slot was not touched")
