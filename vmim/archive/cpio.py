"""cpio (newc) streams, compressed with bzip2 (lbzip2), gzip, zstd or xz, or not at all.

Written by GNU find | cpio; read by vmim.archive.newc, which, unlike GNU cpio, never follows
a symlink an earlier member created. newc carries no xattrs and no ACLs. find and cpio, the
newc extractor and the survey of the tree a store archives (vmim.guestwork) run in the
sandbox (vmim.sandbox); the (de)compressor, which reads or writes the image file, outside.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from vmim import guestwork, process, sandbox
from vmim.archive import StreamFormat, Summary, UnsafeMember, compressor, decompressor, fits, newc
from vmim.errors import OperationError, StateError

log = logging.getLogger(__name__)


class CpioFormat(StreamFormat):
    cannot_carry = ("xattrs", "POSIX ACLs")
    #: the shape of the tree check_tree() last surveyed, recorded with the image it stores
    shape: Optional[Dict[str, int]] = None

    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        # "./" before every path: a guest directory named "-fprint" is a path, not find's option
        find: List[str] = ["find", *(p if p == "." else f"./{p}" for p in paths), "-xdev"]
        if list(paths) == ["."]:
            find += ["-path", "./lost+found", "-prune", "-o"]
        find.append("-print0")
        guest = [sandbox.Bind(src_root, sandbox.SLOT)]
        stages: List[List[str]] = [
            sandbox.command(find, guest, caps=sandbox.READ, cwd=sandbox.SLOT),
            sandbox.command(["cpio", "--create", "--null", "--format=newc", "--quiet"], guest,
                            caps=sandbox.READ, cwd=sandbox.SLOT)]
        if self.compression:
            stages.append(compressor(self.compression))
        return process.pipeline(stages, stdout_path=dest, watch_stage=1,  # cpio reads
                                checksum=True)

    def unpack(self, image: str, staging: str, acl_records: bool = True) -> None:
        log.debug("(newc extractor of %s into %s, in the sandbox)", image, staging)
        guestwork.call("extract-newc", {"root": sandbox.DEST},
                       [sandbox.Bind(staging, sandbox.DEST, writable=True)], caps=sandbox.UNPACK,
                       feed=[decompressor(self.compression)] if self.compression else [],
                       stdin_path=image)

    def check(self, stream: IO[bytes]) -> Summary:
        return newc.check(stream)


    def check_tree(self, root: str, what: str) -> None:
        # the walk of the guest's tree runs in the sandbox, as every reader of guest data;
        # without CAP_SYS_ADMIN it does not see trusted.* names: the count of entries whose
        # xattrs newc drops (a warning) leaves those out
        answer = guestwork.call("survey-cpio", {"root": sandbox.SLOT, "what": what},
                                [sandbox.Bind(root, sandbox.SLOT)], caps=sandbox.READ)
        big, count, with_xattrs, self.shape = survey_answer(answer)
        if count:
            shown = ", ".join(f"/{p}" for p in big)  # escaped where shown (vmim.terminal)
            more = f" and {count - len(big)} more" if count > len(big) else ""
            raise StateError(f"{what}: cpio (newc) cannot hold files of 4 GiB or more, and "
                             f"{count} are there ({shown}{more}); use a tar format "
                             "(--zstd or -z). Nothing was written")
        if with_xattrs:
            log.warning("%s: %s does not carry %s; %d entries lose theirs", what, self.name,
                        " and ".join(self.cannot_carry), with_xattrs)


#: newc's file size field has 8 hex digits
NEWC_MAX_SIZE = (1 << 32) - 1


#: the files too big for newc a refusal names
SHOWN = 5
SHAPE = ("inodes", "most_links", "longest_component", "longest_symlink")


def survey_answer(answer: Any) -> Tuple[List[str], int, int, Dict[str, int]]:
    """The sandboxed survey's answer (vmim.guestwork) as survey() gives it, checked: it
    crossed from a process that read guest data. OperationError when it is not one."""
    def count(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise OperationError(f"the survey in the sandbox answered {answer!r:.200}")
        return value

    if not isinstance(answer, dict) or set(answer) != {"big", "big_count", "xattrs", "shape"} \
            or not isinstance(answer["big"], list) or len(answer["big"]) > SHOWN \
            or not all(isinstance(p, str) for p in answer["big"]) \
            or not isinstance(answer["shape"], dict) or set(answer["shape"]) != set(SHAPE):
        raise OperationError(f"the survey in the sandbox answered {answer!r:.200}")
    big, big_count = list(answer["big"]), count(answer["big_count"])
    if len(big) != min(big_count, SHOWN):  # the first SHOWN of big_count
        raise OperationError(f"the survey in the sandbox answered {answer!r:.200}")
    return big, big_count, count(answer["xattrs"]), {k: count(answer["shape"][k]) for k in SHAPE}


def survey(root: str, what: str = "") -> Tuple[List[str], int, Dict[str, int]]:
    """One walk of root's filesystem (as find -xdev sees it, its top lost+found left out as
    the store leaves it out): the files too big for newc (paths relative to root), how many
    entries carry xattrs (ACLs are xattrs too), which newc drops, and the shape the newc
    extractor makes of the tree (vmim.archive.fits, as newc.check counts it: inodes, the most
    names of one file, the longest name component and symlink target; not the data: zero
    blocks become holes). The walk is iterative and relative to directory descriptors (a
    guest's tree of any depth); a name cpio could not open (longer than PATH_MAX as cpio gets
    it, "./" first) is refused: StateError, nothing written."""
    big: List[str] = []
    n = 0
    inodes = longest_component = longest_symlink = 0
    names_of: Dict[int, int] = {}  # names of each file with more than one
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    top = os.open(root, flags)
    try:
        device = os.fstat(top).st_dev
        below = [""]  # directories still to read, relative to root ("": root itself)
        while below:
            rel = below.pop()
            try:
                fd = os.open(rel or ".", flags, dir_fd=top)
            except OSError:
                continue  # gone, or not a directory any more: find would skip it too
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = entry.name
                        if not rel and name == "lost+found":
                            continue  # find -path ./lost+found -prune
                        path = f"{rel}/{name}" if rel else name
                        try:  # cpio gets "./" first
                            fits.name_ok(f"{what}:", "/" + path, len(os.fsencode(path)) + 2,
                                         "cpio cannot archive")
                        except UnsafeMember as exc:
                            raise StateError(f"{exc} (a guest tree deeper than PATH_MAX); "
                                             "nothing was stored") from None
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            if st.st_dev == device:  # find -xdev: a mount point, not below
                                below.append(path)
                        elif stat.S_ISREG(st.st_mode) and st.st_size > NEWC_MAX_SIZE:
                            big.append(path)
                        elif stat.S_ISLNK(st.st_mode):  # lstat's size: the target's length
                            longest_symlink = max(longest_symlink, st.st_size)
                        longest_component = max(longest_component, len(os.fsencode(name)))
                        try:
                            if os.listxattr(f"/proc/self/fd/{fd}/{name}",
                                            follow_symlinks=False):
                                n += 1
                        except OSError:
                            pass
                        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                            names_of[st.st_ino] = names_of.get(st.st_ino, 0) + 1
                            if names_of[st.st_ino] > 1:
                                continue  # another name of a file already counted
                        inodes += 1
            finally:
                os.close(fd)
    finally:
        os.close(top)
    return big, n, {"inodes": inodes, "most_links": max(names_of.values(), default=1),
                    "longest_component": longest_component, "longest_symlink": longest_symlink}
