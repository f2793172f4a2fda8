"""The guest's tree, seen from the host: paths resolved inside the guest root, merging a
staged tree into it, clearing it.

Symlinks found in the guest are resolved as the guest would resolve them: an absolute target
starts again at the guest's root (a guest `var/run -> /run` means the guest's /run, never
the host's) and `..` stops at it. Archives are never unpacked in place: they go to a fresh
staging directory on the guest's filesystem, and `merge` moves the entries into the guest
with renames, following guest directory symlinks only as the guest would.

merge, target_dir and copy_dir_metadata run in the sandbox (vmim.guestwork), with the guest
root at /slot: even a bug here cannot reach a host file. remove and clear run `rm` there too.
This process itself only makes and marks staging directories at the guest root.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Iterator, List, Optional, Sequence

from vmim import worklog
from vmim.errors import CommandError, OperationError, StateError

log = logging.getLogger(__name__)

MAX_LINKS = 40
#: names vmimagemanager creates at the guest root while it works (staging, temporary)
WORK_PREFIX = ".vmim-"
#: the mark 1.x put on its staging directories. The guest's root can set it too, so it proves
#: nothing: what the tool made is recorded on the host (vmim.worklog). Never copied to the guest.
OWNER_XATTR = "user.vmim.owner"


def _split(path: str) -> List[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve(root: str, guest_path: str, *, follow_last: bool = True) -> str:
    """The host path of guest_path (absolute or relative to the guest root) inside root.

    Components that do not exist are kept as they are (the path may be about to be created).
    """
    root = root.rstrip("/") or "/"
    todo = _split(guest_path)
    done: List[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, part)
        if not todo and not follow_last:
            done.append(part)
            break
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            done.append(part)
            done.extend(todo)
            break
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINKS:
                raise StateError(f"too many levels of symlinks resolving {guest_path} in the guest")
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            todo = _split(target) + todo
            continue
        done.append(part)
    return os.path.join(root, *done)


def guest_relative(root: str, host_path: str) -> str:
    return os.path.relpath(host_path, root)


def makedirs(root: str, guest_path: str) -> str:
    """Create guest_path (inside the guest) and its missing parents; return its host path."""
    path = root
    for part in _split(guest_path):
        path = resolve(root, guest_relative(root, os.path.join(path, part)))
        parent = os.path.dirname(path)
        if path != root and not os.path.isdir(parent):
            # a guest symlink named a directory whose parents are missing too: mkdir -p
            makedirs(root, guest_relative(root, parent))
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise StateError(f"{guest_relative(root, path)} exists in the guest and is not "
                                 "a directory") from None
    return path


def copy_dir_metadata(src: str, dst: str, *, xattrs: bool = True, exact: bool = False) -> None:
    """Give directory dst the owner, mode, times and (with xattrs) extended attributes of src
    (ACLs are system.posix_acl_* attributes). With exact, dst keeps no attribute src lacks: a
    restore's root holds the image's "." and nothing of the previous image's (as after a
    re-made filesystem); else those of dst that src does not set stay (an insert)."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    names = [n for n in os.listxattr(src, follow_symlinks=False) if n != OWNER_XATTR] \
        if xattrs else []
    if exact:
        for name in set(os.listxattr(dst, follow_symlinks=False)) - set(names):
            try:
                os.removexattr(dst, name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.ENODATA):
                    raise
    for name in names:  # OWNER_XATTR: a 1.x staging directory's own mark, never the guest's
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def target_dir(root: str, dest: str = "/") -> str:
    """The host path of guest directory dest, created (inside the guest) when missing."""
    return makedirs(root, dest) if _split(dest) else root


def merge(staging: str, root: str, dest: str = "/", *, exact: bool = False) -> int:
    """Move everything below staging into the guest at guest directory dest; return how many
    entries moved. Staged directories merge into existing ones (following guest directory
    symlinks inside the guest), which keep their owner, mode and times; anything else replaces
    what is there. The target directory takes the staging directory's metadata: staging_dir()
    started it as a copy of the target's, so only an archive entry for "." changes it."""
    target = target_dir(root, dest)
    not_into(staging, target, root, dest)
    moved = _merge_dir(staging, target, root, staging)
    copy_dir_metadata(staging, target, exact=exact)
    return moved


def not_into(staging: str, path: str, root: str, asked: str) -> None:
    """OperationError when path (guest path `asked`, resolved in the guest) is the staging
    directory or in it: a
    guest symlink may name the staging directory (its name is not secret: .vmim-insert.PID,
    dangling until the run makes it), and a merge into it would move the entries onto
    themselves, then remove them with it."""
    staging = os.path.normpath(staging)
    path = os.path.normpath(path)
    if path == staging or path.startswith(staging + os.sep):
        raise OperationError(f"/{asked.strip('/')} in the guest leads to the tool's own staging "
                             f"directory /{guest_relative(root, path)} (through a guest "
                             "symlink): nothing is put there")


def _entries(src_dir: str) -> Iterator[os.DirEntry]:
    with os.scandir(src_dir) as it:
        return iter(sorted(it, key=lambda e: e.name))


def _merge_dir(src_dir: str, dst_dir: str, root: str, staging: str) -> int:
    """The merge of one staged directory into a resolved guest directory, depth first in
    name order; iterative (a stack of the directories open on the way down), so a staged
    tree of any depth merges in bounded stack."""
    moved = 0
    stack = [(_entries(src_dir), dst_dir)]
    while stack:
        entries, dst_dir = stack[-1]
        e = next(entries, None)
        if e is None:
            stack.pop()
            continue
        src = e.path
        # dst_dir is resolved (a directory, no symlink on the way): so is dst, but for a guest
        # symlink at its end (resolve() again from the root for each entry made a merge
        # quadratic in the depth of the tree)
        dst = os.path.join(dst_dir, e.name)
        guest_rel = guest_relative(root, dst)
        if e.is_dir(follow_symlinks=False):
            try:
                st = os.lstat(dst)
                if stat.S_ISLNK(st.st_mode):  # a guest symlink to a directory is followed in
                    dst = resolve(root, guest_rel)  # the guest
                    st = os.lstat(dst)
            except FileNotFoundError:
                not_into(staging, dst, root, guest_rel)
                _rename_in(src, dst, root, guest_rel)
                moved += 1
                continue
            not_into(staging, dst, root, guest_rel)
            if stat.S_ISDIR(st.st_mode):
                stack.append((_entries(src), dst))  # an existing one keeps its metadata
                continue
            os.unlink(dst)
            os.rename(src, dst)
            moved += 1
        else:
            not_into(staging, dst, root, guest_rel)
            try:
                _rename_in(src, dst, root, guest_rel)
            except IsADirectoryError:
                raise OperationError(f"cannot put a file at /{guest_rel} in the guest: "
                                     "a directory is there") from None
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    raise OperationError(f"cannot put a file at /{guest_rel} in the guest: "
                                         "a directory is there") from None
                raise
            moved += 1
    return moved


def _rename_in(src: str, dst: str, root: str, guest_rel: str) -> None:
    """Move a staged entry to dst (guest_rel as the guest names it); a missing parent (a
    dangling guest symlink on the way) is reported with guest paths only."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        where = guest_relative(root, dst)
        via = f" (it leads to /{where} through a guest symlink)" if where != guest_rel else ""
        raise OperationError(f"cannot put /{guest_rel} in the guest: the directory it goes in "
                             f"does not exist{via}") from None


#: where the sandbox shows the guest's root (vmim.sandbox.SLOT)
GUEST = "/slot"


def remove(root: str, names: List[str]) -> None:
    """rm -rf of entries at the guest root, never crossing into other filesystems, in batches,
    in the sandbox (seeing the guest root only)."""
    from vmim import process, sandbox

    for name in names:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a name at the guest root: {name!r}")
    for i in range(0, len(names), 512):
        paths = [f"{GUEST}/{n}" for n in names[i:i + 512]]
        process.run(sandbox.command(["rm", "-rf", "--one-file-system", "--", *paths],
                                    [sandbox.Bind(root, GUEST, writable=True)],
                                    caps=sandbox.DELETE))


def clear(root: str) -> int:
    """Delete the guest's whole content (dotfiles too), keeping the directory lost+found at
    the root only, emptied (empty_lost_found)."""
    names = [n for n in os.listdir(root) if not is_lost_found(root, n)]
    remove(root, names)
    empty_lost_found(root)
    return len(names)


def is_lost_found(root: str, name: str) -> bool:
    """Whether name is the filesystem's lost+found at root: a directory (a symlink or a file
    of that name is the guest's, deleted as any)."""
    return name == "lost+found" and stat.S_ISDIR(os.lstat(os.path.join(root, name)).st_mode)


def empty_lost_found(root: str) -> None:
    """What the previous guest (or fsck) put in the filesystem's lost+found goes with the rest
    of its content: a restore leaves it empty, as a re-made filesystem has it."""
    if not os.path.lexists(os.path.join(root, "lost+found")) or \
            not is_lost_found(root, "lost+found"):
        return
    names = os.listdir(os.path.join(root, "lost+found"))
    if names:
        remove(os.path.join(root, "lost+found"), names)


def leave_out_lost_found(staging: str) -> None:
    """A restore keeps the slot's own lost+found (its filesystem's). The image's is unpacked
    into the staging directory as any member, so that what links into it is made as the proof
    read it (GNU tar told to leave it out fails on a hard link to a member in it, after the
    slot was cleared; the newc extractor made a file empty whose data came under that name),
    and removed from there before the merge."""
    if os.path.lexists(os.path.join(staging, "lost+found")):
        remove(staging, ["lost+found"])


def remove_stale_work(root: str, records: worklog.WorkLog) -> None:
    """Staging directories a killed run left at the guest root: those the host's record
    (worklog) names, made by a run of this tool that has ended, and nothing else. A name or
    an xattr the guest can write proves nothing."""
    stale = records.stale(root)
    if stale:
        log.info("removing what an interrupted run left in the guest: %s", ", ".join(stale))
        try:
            remove(root, list(stale))
        except CommandError as exc:
            # entries the guest made immutable or append-only (chattr): the slot stays usable;
            # the records stay, and a restore with clear = "auto" re-makes the filesystem
            log.warning("what an interrupted run left in the guest could not be removed (%s): "
                        "%s; a restore re-makes the filesystem (clear = \"auto\" or "
                        "\"mkfs\")", ", ".join(stale), exc.stderr_tail.strip()[-200:])
            return
        for n in stale:
            records.forget(n)


def staging_dir(root: str, what: str, like: Optional[str] = None, *,
                records: worklog.WorkLog, like_xattrs: bool = True) -> str:
    """A fresh directory at the guest root to unpack into, with the metadata of directory
    `like` (the merge target), so that an archive without a "." entry changes none of it
    (without `like`: see guestwork's "prepare", which does that in the sandbox). Recorded on
    the host (records) before it is used; remove it with remove_staging()."""
    base = os.path.join(root, f"{WORK_PREFIX}{what}.{os.getpid()}")
    for n in range(0, 1000):
        path = f"{base}.{n}" if n else base
        if os.path.lexists(path):
            continue  # a guest entry of that name: guest data, left alone
        records.begin(os.path.basename(path))  # on the host before it is in the guest
        try:
            os.mkdir(path, 0o700)
            break
        except FileExistsError:
            records.forget(os.path.basename(path))
    else:
        raise StateError(f"cannot make a staging directory at the guest root "
                         f"(/{os.path.basename(base)}.N all exist)")
    try:
        records.made(root, os.path.basename(path))
    except BaseException:
        os.rmdir(path)  # unrecorded, it would never be known as ours
        records.forget(os.path.basename(path))
        raise
    if like is not None:
        # exact: mkdir gave it the root's default ACL, if the root has one, which would pass
        # on to every member the image gives no ACL of its own (a cpio image gives none: the
        # previous guest's ACL on all of the new system's files)
        copy_dir_metadata(like, path, xattrs=like_xattrs, exact=True)
    return path


def named_unlike_its_entries(staging: str, records: worklog.WorkLog) -> str:
    """staging, renamed when one of its entries has its name: an image may hold an entry of
    any name, the staging directory's own too (/.vmim-restore.PID), which moved to the guest
    root would meet the staging directory itself, after the slot was cleared. The new name is
    chosen once the entries are known."""
    name = os.path.basename(staging)
    entries = set(os.listdir(staging))
    if name not in entries:
        return staging
    root = os.path.dirname(staging)
    for n in range(1, 1000):
        new = f"{name}.{n}"
        if new not in entries and not os.path.lexists(os.path.join(root, new)):
            records.rename(root, name, new)
            return os.path.join(root, new)
    raise StateError(f"cannot rename the staging directory /{name}: its image holds "
                     f"/{name}.1 to .999 and the guest root too")


def remove_staging(path: str, records: worklog.WorkLog) -> None:
    """Remove a staging directory (whatever is left in it), then its record."""
    if os.path.lexists(path):
        remove(os.path.dirname(path), [os.path.basename(path)])
    records.forget(os.path.basename(path))


def merge_contained(staging: str, root: str, dest: str = "/", *,
                    remove_staging: bool = False, exact: bool = False) -> int:
    """merge(), run in the sandbox: it sees the guest root (at /slot) and nothing else.
    staging is a directory at the guest root (staging_dir()); with remove_staging, what the
    merge left of it (the directories merged into existing ones) goes too, in the same run."""
    from vmim import guestwork, sandbox

    return int(guestwork.call("merge", {"staging": f"{GUEST}/{os.path.basename(staging)}",
                                        "root": GUEST, "dest": dest,
                                        "remove_staging": remove_staging, "exact": exact},
                              [sandbox.Bind(root, GUEST, writable=True)], caps=sandbox.MERGE))


def move_into_empty(staging: str, root: str, keep: Sequence[str] = ()) -> Optional[int]:
    """A restore's merge when nothing is in the way: root holds only staging, lost+found and
    the names in keep (the set-aside directory being deleted), and staging none of those
    names. Each entry of staging is then renamed into root (rename(2) moves a name and never
    follows it: a guest's symlink stays a symlink, wherever it points) and root takes
    staging's metadata, here: no sandboxed Python to start (0.1 s of a 2 s restore). Returns
    how many entries moved, or None (nothing done) when root holds anything else: then
    merge_contained()."""
    name = os.path.basename(staging)
    reserved = {name, "lost+found", *keep}
    if not set(os.listdir(root)) <= reserved:
        return None
    entries = os.listdir(staging)
    if reserved & set(entries):
        return None
    src = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        dst = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for entry in entries:
                os.rename(entry, entry, src_dir_fd=src, dst_dir_fd=dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    copy_dir_metadata(staging, root, exact=True)
    return len(entries)


def prepare_contained(staging: str, root: str, dest: str) -> None:
    """In the sandbox: make guest directory dest when missing, and give staging its metadata."""
    from vmim import guestwork, sandbox

    guestwork.call("prepare", {"staging": f"{GUEST}/{os.path.basename(staging)}",
                               "root": GUEST, "dest": dest},
                   [sandbox.Bind(root, GUEST, writable=True)], caps=sandbox.MERGE)
