"""Read files of an npm package from ``node_modules``, an unpacked folder, or an ``npm pack`` tarball."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..errors import HMARError


def tarball_name(name: str, version: str) -> str:
    """The file ``npm pack NAME@VERSION`` writes (``@twemoji/svg`` -> ``twemoji-svg-15.0.0.tgz``)."""
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def pack_command(name: str, version: str) -> str:
    """The one-step command that fetches the package into the current folder."""
    return f"npm pack {name}@{version}"


class NpmPackage:
    """One npm package found on disk: an unpacked folder (``root``) or a tarball (``tarball``)."""

    def __init__(self, name: str, root: Optional[Path] = None, tarball: Optional[Path] = None):
        if (root is None) == (tarball is None):
            raise ValueError("give exactly one of root or tarball")
        self.name, self.root, self.tarball = name, root, tarball

    @property
    def location(self) -> Path:
        """Where the package was found."""
        return self.root if self.root is not None else self.tarball  # type: ignore[return-value]

    def select(self, keep: Callable[[str], bool]) -> Dict[str, bytes]:
        """Contents of every file whose package-relative path (``"img/google/64/1f600.png"``) passes ``keep``."""
        out: Dict[str, bytes] = {}
        if self.root is not None:
            for dirpath, _, filenames in os.walk(self.root):
                for fn in filenames:
                    full = Path(dirpath) / fn
                    rel = full.relative_to(self.root).as_posix()
                    if keep(rel):
                        out[rel] = full.read_bytes()
            return out
        try:
            with tarfile.open(self.tarball, "r:gz") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
                    if keep(rel):
                        f = tf.extractfile(member)
                        if f is not None:
                            out[rel] = f.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise HMARError(f"cannot read {self.tarball} ({e}); fetch it again with "
                            f"npm pack {self.name}") from e
        return out

    def read(self, rel: str) -> Optional[bytes]:
        """One file of the package, or None if it has no such file."""
        return self.select(lambda r: r == rel).get(rel)


def _is_package_dir(path: Path, name: str) -> bool:
    meta = path / "package.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("name") == name
    except (OSError, ValueError):
        return False


def find_package(name: str, version: str, source: Optional[Path] = None) -> NpmPackage:
    """Locate package ``name`` under ``source`` (default: ``./node_modules``); HMARError if absent.

    Looked for, in order: ``source/node_modules/NAME``, ``source/NAME``, ``source`` itself,
    ``source/<npm pack tarball>`` (exact version first, then any version of that package).
    """
    base = Path(source) if source is not None else Path.cwd()
    dirs: List[Path] = [base / "node_modules" / name, base / name, base / "package", base]
    for d in dirs:
        if _is_package_dir(d, name):
            return NpmPackage(name, root=d)
    exact = base / tarball_name(name, version)
    if exact.is_file():
        return NpmPackage(name, tarball=exact)
    stem = tarball_name(name, version)[: -len(f"-{version}.tgz")]
    others = sorted(p for p in base.glob(f"{stem}-*.tgz") if p.name[len(stem) + 1:len(stem) + 2].isdigit())
    if others:
        return NpmPackage(name, tarball=others[-1])
    raise HMARError(f"npm package {name}@{version} not found in {base} (looked for node_modules/{name}, "
                    f"{name}/ and {tarball_name(name, version)}); fetch it with: cd {base} && "
                    f"{pack_command(name, version)}")
