"""tar streams, compressed with gzip (pigz), zstd, bzip2 or xz, or not at all."""

from __future__ import annotations

from typing import List, Optional, Sequence

from vmim import process
from vmim.archive import StreamFormat, compressor, decompressor

# XFS shows its POSIX ACLs a second time as trusted.SGI_ACL_*: --acls carries them already.
XATTRS = ["--xattrs", "--xattrs-include=*", "--xattrs-exclude=trusted.SGI_ACL_*", "--acls"]
CREATE = ["--format=posix", "--numeric-owner", *XATTRS,
          "--sparse", "--one-file-system", "--pax-option=delete=atime,delete=ctime"]
EXTRACT = ["--numeric-owner", "--same-owner", "--preserve-permissions", *XATTRS]


class TarFormat(StreamFormat):
    def write(self, src_root: str, paths: Sequence[str], dest: str,
              link_dest: str = "") -> Optional[str]:
        argv: List[str] = ["tar", "--create", "--file=-", f"--directory={src_root}", *CREATE]
        if list(paths) == ["."]:
            argv += ["--anchored", "--exclude=./lost+found"]
        argv += ["--", *paths]
        stages = [argv]
        if self.compression:
            stages.append(compressor(self.compression))
        return process.pipeline(stages, stdout_path=dest, checksum=True)

    def unpack_tools(self) -> List[str]:
        return [*super().unpack_tools(), "tar"]

    def unpack(self, image: str, staging: str) -> None:
        untar = ["tar", "--extract", "--file=-", f"--directory={staging}", *EXTRACT]
        if self.compression:
            process.pipeline([decompressor(self.compression), untar], stdin_path=image)
        else:
            process.pipeline([untar], stdin_path=image)
