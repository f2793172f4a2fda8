"""Scratch directories of a run on the host (/dev/shm, or the temporary directory), and the
sweep of those a killed run left.

GNU tar's listing of a guest tree (a store), the empty directory a proof compares with, the
trial re-make of a slot's filesystem (a sparse file the slot's size) live in directories a
run removes when it is done. A run killed meanwhile cannot: the listing of every path of a
guest stayed in the host's memory (/dev/shm) for good. Each directory is named by the run
that made it (vmim.procscan.owner_tag: pid and start time); every new one first removes those
whose run has ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from typing import Iterator, Optional

from vmim import procscan

log = logging.getLogger(__name__)

#: vmim-WHAT-PID_STARTTIME-RANDOM
NAME = re.compile(r"^vmim-([a-z]+)-(\d+)_(\d+)-[A-Za-z0-9_]+$")


def _base(memory: bool) -> str:
    return "/dev/shm" if memory and os.path.isdir("/dev/shm") else tempfile.gettempdir()


def sweep(base: str) -> None:
    """Remove the scratch directories in base of runs that have ended."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = NAME.match(name)
        if m is None or not procscan.owner_gone(f"{m.group(2)}:{m.group(3)}"):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.geteuid() or not os.path.isdir(path) or os.path.islink(path):
            continue  # not one this user made
        log.debug("removing %s, left by a run that ended", path)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def directory(what: str, *, memory: bool = False, base: Optional[str] = None) -> Iterator[str]:
    """A new private directory (mode 0700) named by this run, removed afterwards; `memory`:
    in /dev/shm when there is one."""
    base = base or _base(memory)
    sweep(base)
    pid, _, started = procscan.owner_tag().partition(":")
    path = tempfile.mkdtemp(prefix=f"vmim-{what}-{pid}_{started}-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
