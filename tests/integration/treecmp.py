"""A tree holding everything a root filesystem can hold, and a comparison of two trees:
lstat fields, xattrs (ACLs included), hard-link groups, content hashes, sparse allocation."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
from typing import Dict, List, Tuple

UID, GID = 12345, 54321  # no such user or group on the host
MTIME = 1_000_000_000_123_456_789
SPARSE_SIZE = 64 * 1024 * 1024
# security.capability v2: cap_net_raw (13) permitted and effective
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _touch(path: bytes, data: bytes = b"", mode: int = 0o644) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def build(root: str) -> None:
    r = os.fsencode(root)
    j = lambda *p: os.path.join(r, *p)  # noqa: E731
    os.makedirs(j(b"etc"), exist_ok=True)
    _touch(j(b"etc", b"hostname"), b"guest\n")
    _touch(j(b".rootdotfile"), b"hidden at the root\n")
    os.makedirs(j(b"usr", b"bin"))
    _touch(j(b"usr", b"bin", b"sudo"), b"\x7fELF setuid\n", 0o4755)
    _touch(j(b"usr", b"bin", b"ping"), b"\x7fELF caps\n", 0o755)
    os.setxattr(j(b"usr", b"bin", b"ping"), "security.capability", CAPABILITY)
    os.makedirs(j(b"srv", b"shared"))
    os.chmod(j(b"srv", b"shared"), 0o2775)
    os.makedirs(j(b"tmp"))
    os.chmod(j(b"tmp"), 0o1777)
    os.makedirs(j(b"home", b"user"))
    _touch(j(b"home", b"user", b"owned"), b"by a uid the host lacks\n", 0o600)
    os.chown(j(b"home", b"user", b"owned"), UID, GID)
    os.chown(j(b"home", b"user"), UID, GID)
    _touch(j(b"home", b"user", b"tagged"), b"xattrs\n")
    os.setxattr(j(b"home", b"user", b"tagged"), "user.comment", b"hello \x00 binary")
    _touch(j(b"home", b"user", b"acl"), b"acl\n", 0o640)
    subprocess.run(["setfacl", "-m", f"u:{UID}:rw,g:{GID}:r", j(b"home", b"user", b"acl")],
                   check=True)
    os.makedirs(j(b"home", b"user", b"acldir"))
    subprocess.run(["setfacl", "-d", "-m", f"u:{UID}:rwx", j(b"home", b"user", b"acldir")],
                   check=True)
    # hard links: one inode, three names
    _touch(j(b"usr", b"bin", b"busybox"), b"multi-call\n", 0o755)
    os.link(j(b"usr", b"bin", b"busybox"), j(b"usr", b"bin", b"sh"))
    os.link(j(b"usr", b"bin", b"busybox"), j(b"etc", b"sh-link"))
    os.symlink(b"busybox", j(b"usr", b"bin", b"ls"))  # relative
    os.symlink(b"/usr/share/zoneinfo/UTC", j(b"etc", b"localtime"))  # absolute, dangling on host
    os.makedirs(j(b"dev"))
    os.mknod(j(b"dev", b"null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(j(b"dev", b"loop200"), 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(j(b"dev", b"initctl"), 0o600)
    # sparse: data at both ends, a hole between
    with open(j(b"var-sparse"), "wb") as fh:
        fh.write(b"start")
        fh.seek(SPARSE_SIZE - 3)
        fh.write(b"end")
    # awkward names and empty directories
    _touch(j(b"name with spaces"), b"spaces\n")
    _touch(j(b"new\nline"), b"newline\n")
    _touch(j(b"bad\xffbyte"), b"not utf-8\n")
    os.makedirs(j(b"empty", b"nested-empty"))
    os.makedirs(j(b"var", b"lib", b"lost+found"))  # not at the root: kept
    _touch(j(b"var", b"lib", b"lost+found", b"keep"), b"kept\n")
    # mtimes last, deepest first
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            if os.path.basename(p) == b"lost+found" and dirpath == r:
                continue
            os.utime(p, ns=(MTIME, MTIME), follow_symlinks=False)


Entry = Dict[str, object]


def snapshot(root: str, *, skip_root_names: Tuple[bytes, ...] = (b"lost+found",),
             mtime_resolution: int = 1) -> Dict[bytes, Entry]:
    r = os.fsencode(root)
    out: Dict[bytes, Entry] = {}
    inodes: Dict[int, List[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(r):
        if dirpath == r:
            dirnames[:] = [d for d in dirnames if d not in skip_root_names]
            filenames = [f for f in filenames if f not in skip_root_names]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, r)
            st = os.lstat(p)
            e: Entry = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": st.st_mtime_ns // mtime_resolution,
            }
            if stat.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                e["sha256"] = h.hexdigest()
                e["sparse"] = st.st_blocks * 512 < st.st_size // 2
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
                e.pop("mode")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            # XFS lists its POSIX ACLs again as trusted.SGI_ACL_*: the same ACL, not data
            e["xattrs"] = {x: os.getxattr(p, x, follow_symlinks=False)
                           for x in sorted(os.listxattr(p, follow_symlinks=False))
                           if not x.startswith("trusted.SGI_ACL_")}
            out[rel] = e
    groups = sorted(sorted(g) for g in inodes.values())
    for g in groups:
        for rel in g:
            out[rel]["links"] = g
    return out


def differences(a: Dict[bytes, Entry], b: Dict[bytes, Entry]) -> List[str]:
    diffs = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a:
            diffs.append(f"only after: {rel!r}")
        elif rel not in b:
            diffs.append(f"missing after: {rel!r}")
        elif a[rel] != b[rel]:
            keys = sorted(k for k in set(a[rel]) | set(b[rel]) if a[rel].get(k) != b[rel].get(k))
            diffs.append(f"{rel!r}: " + ", ".join(
                f"{k}: {a[rel].get(k)!r} != {b[rel].get(k)!r}" for k in keys))
    return diffs


def without_xattrs(snap: Dict[bytes, Entry]) -> Dict[bytes, Entry]:
    """What survives a format that carries no xattrs (and so no ACLs): ACL'd files keep
    their base mode bits."""
    out = {}
    for rel, e in snap.items():
        e = dict(e)
        e["xattrs"] = {}
        out[rel] = e
    return out
