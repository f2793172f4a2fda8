"""rsync: an image is a directory tree mirroring the guest root.

rsync runs in the sandbox (vmim.sandbox): it sees the guest tree, the image tree and, for a
store that links to the previous image (--link-dest), the image store's directory, each at a
fixed name, and nothing else of the host. (Hard links cannot cross two bind mounts, so a store
with --link-dest sees the store directory, which holds both the new and the previous image;
every other directory of the store is hidden under an empty tmpfs.)"""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

from vmim import process, sandbox
from vmim.archive import Format
from vmim.errors import StateError
from vmim.paths import is_under
from vmim.store import META_DIR

# archive mode, hard links, ACLs, xattrs, sparse files, numeric owners; XFS shows its ACLs
# a second time as trusted.SGI_ACL_* xattrs, which -A carries already.
FLAGS = ["-aHAXS", "--numeric-ids", "--filter=-x trusted.SGI_ACL_*", "--filter=-x trusted.vmim.*"]
#: A tree image is the guest's tree on the host's filesystem — setuid programs, owners and
#: device nodes as they are — so its top directory is closed to other users (0700), and the
#: mode it had (the guest root's) is kept in this xattr and given back to the target after a
#: restore or insert (never carried by rsync itself: the filter above)
ROOT_MODE = "trusted.vmim.root-mode"
log = logging.getLogger(__name__)
GUEST, IMAGE, STORE = sandbox.SLOT, sandbox.IMAGE, sandbox.STORE  # inside the sandbox


class RsyncFormat(Format):
    name = "rsync"
    is_tree = True

    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        argv: List[str] = ["rsync", *FLAGS, "--one-file-system"]
        binds = [sandbox.Bind(src_root, GUEST)]
        if link_dest:  # the new and the previous image share the store's directory
            store = os.path.dirname(os.path.abspath(link_dest))
            if os.path.abspath(dest) == store or not is_under(os.path.abspath(dest), store):
                raise ValueError("dest must lie in link_dest's directory")
            binds.append(sandbox.Bind(store, STORE, writable=True))
            meta = os.path.join(store, META_DIR)
            if os.path.isdir(meta):  # the recorded digests that prove the other images:
                binds.append(sandbox.Bind(meta, sandbox.STORE_META))  # not the guest's to write
            work = os.path.relpath(os.path.abspath(dest), store)
            binds += _others_hidden(store, {os.path.basename(link_dest), META_DIR,
                                            work.split(os.sep)[0]})
            argv.append(f"--link-dest={STORE}/{os.path.basename(link_dest)}")
            inside = f"{STORE}/{work}"
        else:
            os.makedirs(dest, exist_ok=True)
            binds.append(sandbox.Bind(dest, IMAGE, writable=True))
            inside = IMAGE
        if list(paths) == ["."]:
            argv += ["--exclude=/lost+found", f"{GUEST}/", f"{inside}/"]
        else:
            os.makedirs(dest, exist_ok=True)
            argv += ["--relative", *(f"{GUEST}/./{p}" for p in paths), f"{inside}/"]
        process.run(sandbox.command(argv, binds, caps=sandbox.COPY))
        close_top(dest)
        return None

    def unpack_tools(self) -> List[str]:
        return ["rsync"]

    def unpack(self, image: str, staging: str, acl_records: bool = True) -> None:
        process.run(sandbox.command(["rsync", *FLAGS, f"{IMAGE}/", f"{GUEST}/"],
                                    [sandbox.Bind(image, IMAGE),
                                     sandbox.Bind(staging, GUEST, writable=True)],
                                    caps=sandbox.COPY))
        give_back_top(image, staging)

    def mirror(self, image: str, target: str) -> None:
        """Make target an exact copy of the image (restore): only the differences move; the
        slot's lost+found stays its filesystem's. The differences are found by content
        (--checksum), not by size and mtime: the guest sets its files' mtimes at will, and a
        file it changed and gave back its size and mtime survived every restore."""
        process.run(sandbox.command(
            ["rsync", *FLAGS, "--checksum", "--delete", "--exclude=/lost+found",
             f"{IMAGE}/", f"{GUEST}/"],
            [sandbox.Bind(image, IMAGE), sandbox.Bind(target, GUEST, writable=True)],
            caps=sandbox.COPY))
        give_back_top(image, target)

    def verify(self, image: str) -> None:
        if not os.path.isdir(image):
            raise StateError(f"rsync image {image} is not a directory")


def _others_hidden(store: str, keep: set) -> List[sandbox.Bind]:
    """Every directory of the store but those in keep, hidden (an empty tmpfs over each): rsync
    --link-dest follows the directories on the way to a candidate in the previous tree, which
    holds the guest's symlinks, and links a candidate whose size, mtime, mode and owner match
    without reading it — through `etc -> ../other/etc`, another image's file."""
    hidden = []
    with os.scandir(store) as entries:
        for e in entries:
            if e.name not in keep and e.is_dir(follow_symlinks=False):
                hidden.append(sandbox.Bind("", f"{STORE}/{e.name}", hidden=True))
    return hidden


def close_top(tree: str) -> None:
    """A tree just stored: its top directory closed to other users, its mode kept (ROOT_MODE).
    A filesystem without trusted.* xattrs (NFS) keeps the mode, and the tree open: said."""
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd).st_mode & 0o7777
        try:
            os.setxattr(fd, ROOT_MODE, b"%o" % mode)
        except OSError as exc:
            log.warning("the tree image %s stays open to other users (mode %o): its store "
                        "keeps no trusted.* xattrs (%s); keep the store closed (mode 0700)",
                        tree, mode, exc.strerror)
            return
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def give_back_top(tree: str, target: str) -> None:
    """After a restore or insert from tree: target's mode the one its top directory had."""
    try:
        mode = int(os.getxattr(tree, ROOT_MODE).decode("ascii"), 8) & 0o7777
    except (OSError, ValueError):  # a tree of an older release: rsync gave its mode already
        return
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
