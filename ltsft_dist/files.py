"""Atomic file writes: a reader, a resumed run or another rank never sees a half-written file.

Temp files get unique names (`mkstemp`), so processes writing the same target at once (every rank of a launch on a
shared file system) never rename each other's temp file away.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file to a temp file beside it, then move all into place; on error nothing is replaced."""
    temps = {}
    try:
        for target, write in writers.items():
            fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            temps[target] = Path(temp)
            write(temps[target])
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
        for target, temp in temps.items():
            os.replace(temp, target)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically."""
    path = Path(path)
    write_atomically({path: lambda p: p.write_text(text, encoding="utf-8")})
