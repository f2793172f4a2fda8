"""Deleting a slot's old content while the new image is unpacked (`clear` chose delete).

Deleting a tree costs one unlink per file (3–5 s for the 56k files of the bench corpus on
a busy 2-core host), and before this it ran alone before the unpack. When the filesystem
has room for the old content and the new one at once, the old content is instead moved
into one directory at the guest root (a rename per top-level entry: instant) and `rm -rf`
deletes it in a thread while the image is unpacked into the staging directory; the restore
waits for it after the merge, and the wait is the restore's "delete" timing. Without that
room it is deleted first, as before.

The directory is made like a staging directory (tree.staging_dir: recorded on the host,
vmim.worklog), so a run killed halfway leaves nothing that the next mount does not remove;
the `rm` runs in the sandbox, as every removal in the guest does (tree.remove).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from typing import Optional

from vmim import signals, tree, worklog
from vmim.errors import CommandError

log = logging.getLogger(__name__)

#: left free beside both trees (journal, directories, the filesystem's reserve)
MARGIN_BYTES = 256 * 1024 * 1024
MARGIN_INODES = 1024


def room_for_both(root: str, needs_bytes: int = 0, needs_inodes: int = 0) -> bool:
    """Whether the filesystem at root can hold its present content and a new tree of the
    same size (or of needs_bytes and needs_inodes, when they are larger) at once."""
    st = os.statvfs(root)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize
    inodes_used = st.f_files - st.f_ffree
    return (free >= max(used, needs_bytes) + MARGIN_BYTES
            and st.f_favail >= max(inodes_used, needs_inodes) + MARGIN_INODES)


class Deletion:
    """The old content of root, set aside and being deleted by a thread."""

    def __init__(self, root: str, records: worklog.WorkLog):
        self.root = root
        self.records = records
        self.path = tree.staging_dir(root, "trash", like=root, records=records)
        self.seconds = 0.0  # how long the deletion ran (beside the unpack)
        self.error: Optional[BaseException] = None
        self._waited = False
        names = [n for n in os.listdir(root)
                 if not tree.is_lost_found(root, n) and os.path.join(root, n) != self.path]
        for n in names:
            os.rename(os.path.join(root, n), os.path.join(self.path, n))
        lost = os.path.join(root, "lost+found")
        if os.path.lexists(lost) and tree.is_lost_found(root, "lost+found"):
            # its content goes too (the directory is the filesystem's): into a directory of
            # its own in the set-aside one, named unlike anything moved there
            aside = tempfile.mkdtemp(prefix="lost+found.", dir=self.path)
            for n in os.listdir(lost):
                os.rename(os.path.join(lost, n), os.path.join(aside, n))
        self._thread = threading.Thread(target=self._run, name="vmim-delete", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            tree.remove_staging(self.path, self.records)
        except BaseException as exc:  # noqa: BLE001 — handed to the restore by wait()
            self.error = exc
        self.seconds = round(time.monotonic() - started, 3)

    def in_the_way(self, staging: str) -> bool:
        """Whether the unpacked image has an entry of the set-aside directory's name (a
        merge would put it into what is being deleted)."""
        return os.path.lexists(os.path.join(staging, os.path.basename(self.path)))

    def wait(self) -> None:
        """Wait for the deletion; raise what it failed with."""
        with signals.waiting():  # interrupted, finish_quietly() waits for it to end
            self._thread.join()
        self._waited = True
        if isinstance(self.error, CommandError) and \
                "Operation not permitted" in self.error.stderr_tail:
            raise CommandError(self.error.argv, self.error.returncode,
                               self.error.stderr_tail + "\n(files the guest made immutable or "
                               "append-only, `chattr`, cannot be deleted: clear = \"mkfs\" in "
                               "the slot's section re-makes the filesystem instead)")
        if self.error is not None:
            raise self.error

    def finish_quietly(self) -> None:
        """However the restore ends: wait for the deletion, if nothing did (process.cancel_all
        stops its rm on a signal); a failure of its own is logged: the restore's failure is
        the one reported."""
        if self._waited:
            return
        self._thread.join()
        if self.error is not None:
            log.warning("deleting the old content of %s failed too: %s", self.root, self.error)
