"""The sandbox of every process that reads or writes guest data (design §2, issue 20).

`command(argv, binds)` wraps an argv so that it runs under bubblewrap in a private mount
namespace that holds no host path but a read-only /usr (with the merged-usr links /bin, /lib,
/lib64, /sbin), a minimal /dev without block devices, its own /proc (read-only), an empty /tmp, and
exactly the binds the caller names, at fixed names (/slot, /image, /dest ...). A guest symlink
or hard link then cannot name a host file: none is there. No network, and its own ipc, pid
and uts namespaces; it dies with the command that started it.

Root stays root inside (no user namespace), with only the capabilities its one command needs:
each call names one of the sets below (`caps=`, required: a new call site cannot forget it),
the smallest that does the work: NONE to look, READ to read every file of a guest tree,
READ_XATTRS to read its trusted.* xattrs too, DELETE to remove it, UNPACK to write what a
filesystem holds (owners, modes, device nodes, reserved blocks), UNPACK_XATTRS with file
capabilities and trusted.* xattrs, COPY (rsync: READ_XATTRS and UNPACK_XATTRS) and MERGE
(renames into the guest and a directory's metadata). bwrap makes every bind nodev and nosuid:
a device node an archive creates cannot be opened in the sandbox. A seccomp filter
(vmim.seccomp) denies the system calls no program on guest data needs (mount, namespaces,
keyrings, ptrace, kernel modules ...); without libseccomp's Python binding nothing runs.

bwrap itself, as every command of a run, dies with the run (process.dies_with_run: setpriv
--pdeathsig KILL, and a check that the run was still its parent once that was set), and
--die-with-parent takes what runs inside; what a run killed before this version left is found by
procscan.reap_orphans().

Not `--new-session`: process.popen() already starts each command in a session of its own,
without a controlling terminal, and keeping the sandboxed program in that session's process
group lets process.stop() kill it and wait until it is gone.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence

from vmim import procscan, seccomp
from vmim.errors import ToolMissingError

BWRAP = "bwrap"
INSTALL_HINT = "Fedora/RHEL: dnf install bubblewrap; vmimagemanager runs every program that " \
               "reads or writes guest data in its sandbox"

#: the only host tree the sandbox sees (read-only)
SYSTEM = "/usr"
#: merged-usr links of Debian 12 and Fedora: name -> target inside /usr
USR_LINKS = {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64"}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the capabilities a sandbox may keep (name -> bit); each command keeps one set of them
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2,
                "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24,
                "CAP_MKNOD": 27, "CAP_SETFCAP": 31}
Caps = FrozenSet[str]
#: looking only: a listing, a proof, a hash (files every user may read)
NONE: Caps = frozenset()
#: reading every file and directory of a guest tree, whatever its mode (store, extract)
READ: Caps = frozenset({"CAP_DAC_READ_SEARCH"})
#: ... and its trusted.* xattrs, which only CAP_SYS_ADMIN lists and reads (tar --xattrs)
READ_XATTRS: Caps = READ | {"CAP_SYS_ADMIN"}
#: removing a guest tree: entries of directories without write permission, of sticky ones
DELETE: Caps = frozenset({"CAP_DAC_OVERRIDE", "CAP_FOWNER"})
#: writing what a filesystem holds: owners, modes with setuid/setgid, times, device nodes,
#: directories without write permission, the blocks reserved for root (newc: no xattrs)
UNPACK: Caps = frozenset({"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
                          "CAP_MKNOD", "CAP_SYS_RESOURCE"})
#: ... with xattrs: file capabilities (security.capability) and trusted.* (tar --xattrs)
UNPACK_XATTRS: Caps = UNPACK | {"CAP_SETFCAP", "CAP_SYS_ADMIN"}
#: rsync -aHAXS: reads one tree with its xattrs, writes another with them
COPY: Caps = READ_XATTRS | UNPACK_XATTRS
#: moving a staging directory's entries into the guest and giving a directory its owner, mode,
#: xattrs and times (tree.merge, tree.copy_dir_metadata), then removing what is left
MERGE: Caps = frozenset({"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
                         "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"})
#: every named set (what the tests and the docs go through)
SETS: Dict[str, Caps] = {"NONE": NONE, "READ": READ, "READ_XATTRS": READ_XATTRS,
                         "DELETE": DELETE, "UNPACK": UNPACK, "UNPACK_XATTRS": UNPACK_XATTRS,
                         "COPY": COPY, "MERGE": MERGE}
#: where the vmim package is seen inside (for the Python programs run there)
LIBRARY = "/vmim-lib"
#: the fixed names binds take inside: the guest tree (a slot's root, or the tree archived), the
#: directory unpacked into, an image, an image store's directory
SLOT, DEST, IMAGE, STORE = "/slot", "/dest", "/image", "/store"
#: all of them (what procscan looks for in a leftover sandbox)
#: the image store's metadata (vmim.store.META_DIR), bound read-only over the store's directory
STORE_META = f"{STORE}/.vmim"
PLACES = (SLOT, DEST, IMAGE, STORE, STORE_META)
#: stands for the descriptor of the seccomp filter in the argv: process.popen() opens one for
#: each sandbox (bwrap reads it to its end) and puts its number there
SECCOMP_FD = "{seccomp-fd}"


@dataclass(frozen=True)
class Bind:
    """A host path seen inside the sandbox at a fixed name."""

    source: str
    inside: str
    writable: bool = False
    #: not a bind: an empty tmpfs over a directory of an earlier bind (an image store's
    #: other entries, hidden from a store that sees the store's directory: /store/NAME)
    hidden: bool = False


class Sandboxed(List[str]):
    """The bwrap argv of a command; `shown` is the command itself, as messages name it."""

    shown: List[str]


def shown(argv: Sequence[str]) -> List[str]:
    """The argv as messages name it: a sandboxed command's own argv, not bwrap's."""
    return [str(a) for a in getattr(argv, "shown", argv)]


def _bounding_set() -> int:
    """This process's capability bounding set (a container may lack some)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapBnd:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def capabilities(caps: Caps) -> List[str]:
    """Those of caps (a set of CAPABILITIES) this process may hand on, in CAPABILITIES' order.
    (bwrap 0.8 asked to add one outside the bounding set keeps every capability instead: never
    ask it.)"""
    unknown = set(caps) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"sandbox: not a capability it may keep: {sorted(unknown)}")
    have = _bounding_set()
    return [name for name, bit in CAPABILITIES.items() if name in caps and have >> bit & 1]


def keeps(cap: str) -> bool:
    """Whether a sandbox given cap keeps it here (the host's bounding set has it)."""
    return capabilities(frozenset({cap})) == [cap]


def _bwrap() -> str:
    path = shutil.which(BWRAP)
    if path is None:
        raise ToolMissingError(BWRAP, INSTALL_HINT)
    return path


def _inside_path(tool: str) -> str:
    """The full path of a program the sandbox runs: it must live under /usr."""
    if tool.startswith("/"):
        path: Optional[str] = tool
    else:
        path = shutil.which(tool, path=PATH)
    if path is None:
        raise ToolMissingError(tool)
    real = os.path.realpath(path)
    if not (real + "/").startswith(SYSTEM + "/"):
        raise ToolMissingError(tool, f"it is {real}, and the sandbox of guest data sees only "
                               f"{SYSTEM}: install it there")
    return path


def command(argv: Sequence[str], binds: Sequence[Bind], *, caps: Caps,
            cwd: Optional[str] = None, env: Optional[dict] = None) -> Sandboxed:
    """argv to run in the sandbox, seeing `binds` and nothing else of the host, keeping only
    the capabilities `caps` (one of the sets above); `cwd` is a path inside. The first word is
    found on the sandbox's PATH (under /usr)."""
    argv = [str(a) for a in argv]
    out = Sandboxed([_bwrap(), "--ro-bind", SYSTEM, SYSTEM])
    for name, target in USR_LINKS.items():
        if os.path.lexists(os.path.join(SYSTEM, target[len("usr/"):])):
            out += ["--symlink", target, name]
    # /proc read-only: bwrap covers only sys, sysrq-trigger, irq and bus, and CAP_SYS_ADMIN
    # writes /proc/mtrr (the host CPU's memory caching); nothing in the sandbox writes there
    out += ["--dev", "/dev", "--proc", "/proc", "--remount-ro", "/proc", "--tmpfs", "/tmp",
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent",
            "--cap-drop", "ALL"]
    for cap in capabilities(caps):
        out += ["--cap-add", cap]
    seccomp.ensure()  # no binding, no filter: nothing runs (exit 7)
    out += ["--seccomp", SECCOMP_FD]
    for b in binds:
        if b.hidden:
            name = b.inside[len(STORE) + 1:]
            if not b.inside.startswith(STORE + "/") or "/" in name or name in ("", ".", ".."):
                raise ValueError(f"sandbox: bad place to hide: {b.inside!r}")
            out += ["--tmpfs", b.inside]
            continue
        if not b.inside.startswith("/") or not (b.inside in PLACES or
                                                b.inside.startswith(LIBRARY + "/")):
            raise ValueError(f"sandbox: bad place for a bind: {b.inside!r}")
        out += ["--bind" if b.writable else "--ro-bind", b.source, b.inside]
    variables = {"PATH": PATH, "LC_ALL": "C", procscan.OWNER_ENV: procscan.owner_tag(),
                 **(env or {})}
    out.append("--clearenv")
    for key, value in variables.items():
        out += ["--setenv", key, value]
    if cwd is not None:
        out += ["--chdir", cwd]
    out += ["--", _inside_path(argv[0]), *argv[1:]]
    out.shown = argv
    return out


def python(module: str, args: Sequence[str], binds: Sequence[Bind], *, caps: Caps,
           cwd: Optional[str] = None) -> Sandboxed:
    """`python3 -m module args` in the sandbox, with this vmim package read-only at LIBRARY.

    The interpreter is the one running now when it lives under /usr, else /usr/bin/python3."""
    import vmim

    package = os.path.dirname(os.path.abspath(vmim.__file__))
    here = os.path.realpath(sys.executable)
    interpreter = here if (here + "/").startswith(SYSTEM + "/") else "/usr/bin/python3"
    return command([interpreter, "-s", "-S", "-B", "-m", module, *args],
                   [*binds, Bind(package, f"{LIBRARY}/vmim")], caps=caps, cwd=cwd,
                   env={"PYTHONPATH": LIBRARY, "PYTHONDONTWRITEBYTECODE": "1"})
