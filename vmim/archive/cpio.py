"""cpio (newc) streams, compressed with bzip2 (lbzip2), gzip, zstd or xz, or not at all.

Written by GNU find | cpio; read by vmim.archive.newc, which, unlike GNU cpio, never follows
a symlink an earlier member created. newc carries no xattrs and no ACLs.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import List, Optional, Sequence

from vmim import process
from vmim.archive import StreamFormat, compressor, decompressor, newc
from vmim.errors import CommandError

log = logging.getLogger(__name__)


class CpioFormat(StreamFormat):
    cannot_carry = ("xattrs", "POSIX ACLs")

    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        find: List[str] = ["find", *paths, "-xdev"]
        if list(paths) == ["."]:
            find += ["-path", "./lost+found", "-prune", "-o"]
        find.append("-print0")
        stages = [find, ["cpio", "--create", "--null", "--format=newc", "--quiet"]]
        if self.compression:
            stages.append(compressor(self.compression))
        return process.pipeline(stages, stdout_path=dest, cwd=src_root, watch_stage=1,  # cpio reads
                                checksum=True)

    def unpack(self, image: str, staging: str) -> None:
        argv = decompressor(self.compression) + [image] if self.compression else ["cat", image]
        log.debug("+ %s | (newc extractor into %s)", process.quote_argv(argv), staging)
        proc = process.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        with process.track(proc):
            try:
                newc.extract(proc.stdout, staging)
            except BaseException:
                process.stop(proc)
                raise
            finally:
                proc.stdout.close()
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.stderr.close()
        if proc.wait() != 0:
            raise CommandError(argv, proc.returncode, err)


def count_with_xattrs(root: str) -> int:
    """How many entries below root (on its filesystem) carry xattrs (ACLs are xattrs too):
    what cpio drops."""
    n = 0
    device = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        # as find -xdev: what is mounted below is not archived, so not counted either
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == device]
        for name in dirnames + filenames:
            try:
                if os.listxattr(os.path.join(dirpath, name), follow_symlinks=False):
                    n += 1
            except OSError:
                pass
    return n
