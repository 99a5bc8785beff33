"""Atomic file writes: every file hmar writes for a user (models, caches, samples, metrics) goes through
:func:`atomic_path`, so an interrupted or failed write (Ctrl-C, a full disk, a crash) leaves the previous file or
none, never a truncated one."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an error it is renamed
    over ``path`` (one ``os.replace``), else removed. Its ``.part`` suffix is no image, cache or model suffix, so
    a reader of the folder never takes it for a finished file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
