"""Atomic file writes: every file hmar writes for a user (models, caches, samples, metrics) goes through
:func:`atomic_path`, so an interrupted or failed write (Ctrl-C, a full disk, a crash) leaves the previous file or
none, never a truncated one."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from .errors import HMARError

_UMASK = os.umask(0o022)
os.umask(_UMASK)   # read once (os.umask can only be read by setting it): files get 0o666 & ~umask, as open() gives


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an error it is renamed
    over ``path`` (one ``os.replace``), else removed. Its ``.part`` suffix is no image, cache or model suffix, so
    a reader of the folder never takes it for a finished file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
        if tmp.exists():   # writers that make their own temporary file (safetensors) leave it 0600
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable_dir(directory: Union[str, os.PathLike], what: str = "--out", create: bool = True) -> Path:
    """Create ``directory`` (and its parents) and check that files can be written in it, before any slow work;
    :class:`HMARError` naming ``what`` if not (a read-only or system folder, a path through a file). With
    ``create=False`` nothing is made: its nearest existing folder is checked instead (for a command that may still
    fail before writing)."""
    d = Path(directory)
    probe = d
    try:
        if create:
            d.mkdir(parents=True, exist_ok=True)
        else:
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise HMARError(f"{what}: cannot write into {str(d)!r} ({e.strerror or e}): choose a writable folder") from None
    return d
