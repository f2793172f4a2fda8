"""Where a file holds data and where holes, read with SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import os
from typing import List, Set, Tuple


def data_ranges(path: str) -> List[Tuple[int, int]]:
    """The (start, end) byte ranges of a file that hold data."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def data_blocks(path: str, block: int = 4096) -> Set[int]:
    """Indexes of the blocks of a file that hold data."""
    return {i for start, end in data_ranges(path)
            for i in range(start // block, (end + block - 1) // block)}
