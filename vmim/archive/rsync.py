"""rsync: an image is a directory tree mirroring the guest root."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from vmim import process
from vmim.archive import Format
from vmim.errors import StateError

# archive mode, hard links, ACLs, xattrs, sparse files, numeric owners; XFS shows its ACLs
# a second time as trusted.SGI_ACL_* xattrs, which -A carries already.
FLAGS = ["-aHAXS", "--numeric-ids", "--filter=-x trusted.SGI_ACL_*"]


class RsyncFormat(Format):
    name = "rsync"
    is_tree = True

    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        argv: List[str] = ["rsync", *FLAGS, "--one-file-system"]
        if link_dest:
            argv.append(f"--link-dest={os.path.abspath(link_dest)}")
        if list(paths) == ["."]:
            argv += ["--exclude=/lost+found", f"{src_root}/", f"{dest}/"]
        else:
            os.makedirs(dest, exist_ok=True)
            argv += ["--relative", *(f"{src_root}/./{p}" for p in paths), f"{dest}/"]
        process.run(argv)
        return None

    def unpack_tools(self) -> List[str]:
        return ["rsync"]

    def unpack(self, image: str, staging: str) -> None:
        process.run(["rsync", *FLAGS, f"{image}/", f"{staging}/"])

    def mirror(self, image: str, target: str) -> None:
        """Make target an exact copy of the image (restore): only the differences move."""
        process.run(["rsync", *FLAGS, "--delete", "--exclude=/lost+found", f"{image}/", f"{target}/"])

    def verify(self, image: str) -> None:
        if not os.path.isdir(image):
            raise StateError(f"rsync image {image} is not a directory")
