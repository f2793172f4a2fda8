"""What /proc says of processes: start times and owner tags (which run started a command),
process groups, the users of a path, and the commands a killed run left running."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Dict, List, Optional, Sequence

from vmim.paths import is_under

log = logging.getLogger(__name__)

#: Every child carries the pid and start time of the run that started it, so that a later run
#: can find (and stop) what a run killed by SIGKILL left running: see reap_orphans().
OWNER_ENV = "VMIM_OWNER"

#: How long to wait for a stopped command's processes (forked helpers too) to be gone.
GONE_TIMEOUT = 10.0


def _start_time(pid: int) -> Optional[str]:
    """The start time of a process (clock ticks since boot), which tells a pid's reuse apart."""
    stat = _stat_fields(pid)
    return stat[19] if stat else None


def _stat_fields(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...], or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def owner_tag() -> str:
    """This run, as its commands carry it in OWNER_ENV: pid and start time."""
    pid = os.getpid()
    return f"{pid}:{_start_time(pid)}"


def owner_of(pid: str) -> Optional[str]:
    """The owner tag (OWNER_ENV) a process carries: the run that started it; None for a
    process that carries none, or is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read().split(b"\0")
    except OSError:
        return None
    mark = OWNER_ENV.encode() + b"="
    return next((e[len(mark):].decode("ascii", "replace") for e in environ
                 if e.startswith(mark)), None)


def owner_gone(tag: str) -> bool:
    """Whether the run an owner_tag() names has ended (its pid is gone, or is another process)."""
    owner, _, started = tag.partition(":")
    return not (owner.isdigit() and _start_time(int(owner)) == started)


def group_members(pgid: int) -> List[int]:
    """Live (not zombie) processes of a process group."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat_fields(int(name))
            if stat and stat[2] == str(pgid) and stat[0] not in ("Z", "X"):
                found.append(int(name))
    return found


def wait_gone(pids: Sequence[int], timeout: float = GONE_TIMEOUT) -> List[int]:
    """Wait until none of pids is alive (zombies count as gone); return those still alive."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left:
        left = [p for p in left if (_stat_fields(p) or ["X"])[0] not in ("Z", "X")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return left



def path_users(top: str, pids: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Processes (all, or those of pids) whose working directory, root, executable or open files
    lie under top: pid -> what of theirs does ("cwd", "root", "exe", "open file")."""
    top = os.path.realpath(top)
    found: Dict[str, List[str]] = {}
    for pid in pids if pids is not None else os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        base = f"/proc/{pid}"
        why: List[str] = []
        for link in ("cwd", "root", "exe"):
            try:
                if is_under(os.readlink(f"{base}/{link}"), top) and not (link == "root" and top == "/"):
                    why.append(link)
            except OSError:
                pass
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                if is_under(os.readlink(f"{base}/fd/{fd}"), top):
                    why.append("open file")
                    break
            except OSError:
                pass
        if why:
            found[pid] = why
    return found


def cmdline(pid: int) -> List[str]:
    """A process's command line ([] when it is gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return []
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]


def comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


#: How many times reap_orphans() looks again after stopping what it found: a sandbox being set
#: up forks (bwrap, then its init in the new namespaces, then the command) between two looks.
REAP_ROUNDS = 5


def reap_orphans(paths: Sequence[str]) -> List[str]:
    """Stop the commands that runs killed by SIGKILL left running in or on `paths` (a slot's
    mount point, a store's debris): they carry OWNER_ENV naming a run that is gone, and would go
    on writing there while this run cleans up. Such a command is in the way when it uses a
    path below them (working directory, root, executable, open file), when it is a sandbox of
    guest data binding one of them (read from its command line: a sandbox still being set up
    binds nothing yet), or when it has the filesystem mounted at one of them mounted in a
    mount namespace of its own, wherever there. A helper daemon that a command started
    elsewhere is not touched (the FUSE export of a qcow2 slot left mounted), nor what binds
    other paths. Looks again until nothing more is found, as what it stops may have forked
    meanwhile. Returns what was stopped."""
    devnos = set()
    for top in paths:
        try:
            if os.path.ismount(top):
                devnos.add(os.stat(top).st_dev)
        except OSError:
            pass
    described: List[str] = []
    for _ in range(REAP_ROUNDS):
        found = _orphans_in_the_way(paths, devnos)
        victims: List[int] = []
        for pid, run in sorted(found.items(), key=lambda item: int(item[0])):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue
            victims.append(int(pid))
            described.append(f"pid {pid} ({comm(pid)}, of run {run})")
        if not victims:
            break
        wait_gone(victims)
    if described:
        log.warning("stopped what an interrupted run left running: %s", "; ".join(described))
    return described


def _orphans_in_the_way(paths: Sequence[str], devnos: set) -> Dict[str, str]:
    """What reap_orphans() stops: pid -> the run that started it."""
    orphans: Dict[str, str] = {}  # pid -> the run that started it
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        tag = owner_of(name)
        if tag is not None and owner_gone(tag):
            orphans[name] = tag.partition(":")[0]
    in_the_way = {pid for top in paths for pid in path_users(top, list(orphans))}
    tops = [os.path.realpath(top) for top in paths]
    ours = mount_namespace("self")
    for pid in orphans:
        if pid in in_the_way:
            continue
        sources = sandbox_sources(cmdline(int(pid)))
        if any(is_under(s, top) or is_under(top, s) for s in sources for top in tops) or (
                devnos and mount_namespace(pid) not in ("", ours) and
                devnos & mounted_devices(pid)):
            in_the_way.add(pid)
    return {pid: orphans[pid] for pid in in_the_way}


def sandbox_sources(argv: Sequence[str]) -> List[str]:
    """The host paths a sandbox of guest data (vmim.sandbox.command) binds at its places
    (/slot, /dest ...: sandbox.PLACES), read from its command line at any stage of its start
    (setpriv and the shell of process.dies_with_run, bwrap, bwrap's init); [] for any other
    command."""
    from vmim.sandbox import PLACES

    start = next((i for i, a in enumerate(argv) if os.path.basename(a) == "bwrap"), None)
    if start is None:
        return []
    options = list(argv[start + 1:])
    options = options[:options.index("--")] if "--" in options else []  # then the command's
    if "--die-with-parent" not in options:
        return []
    return [os.path.realpath(options[i + 1]) for i, a in enumerate(options[:-2])
            if a in ("--bind", "--ro-bind") and options[i + 2] in PLACES]


def mount_namespace(pid: str) -> str:
    """A process's mount namespace ("self": ours), "" when it is gone or exiting."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def mounted_devices(pid: str) -> set:
    """The filesystems (st_dev) mounted anywhere in a process's mount namespace."""
    from vmim.disk.mounts import parse_mountinfo  # which imports this module

    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            return {m.devno for m in parse_mountinfo(fh.read())}
    except (OSError, ValueError):
        return set()


def pid_alive(pid_text: str) -> bool:
    """Whether a process with this pid (as text, from a file name) exists."""
    return pid_text.isdigit() and os.path.exists(f"/proc/{pid_text}")
