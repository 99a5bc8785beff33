"""Emoji image folders from npm packages, labelled by Unicode emoji category or subcategory.

Sources (``--sources``):

* ``google``  : ``emoji-datasource-google@16.0.0`` 64 px PNGs (Noto art, Apache-2.0)
* ``twitter`` : ``emoji-datasource-twitter@16.0.0`` 64 px PNGs (Twemoji art, CC-BY 4.0)
* ``openmoji``: ``openmoji@17.0.0`` colour SVGs (CC BY-SA 4.0), labelled by its own ``group``
* ``twemoji`` : ``@twemoji/svg@15.0.0`` SVGs (Twemoji art, CC-BY 4.0), joined on code points
  with ``emoji.json`` of emoji-datasource for labels

PNGs are composited on white and resized with Lanczos; SVGs are drawn directly at ``size``
with ``resvg-py`` or ``cairosvg`` (whichever is installed). The 9 classes of ``category`` are
the Unicode groups without "Component"; ``subcategory`` has the 99 Unicode subgroups of those.
The train/val split hashes the code points, so every art style of one emoji lands in the same
split. Output: ``OUT/{train,val}/<NN_class>/<source>_<codepoints>.png`` (RGB).
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image

from ..errors import HMARError
from .folder import class_dir_name, clear_class_folders, slugify, split_for_key, to_rgb, write_metadata
from .npm import NpmPackage, find_package, pack_command

CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
              "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
OPENMOJI_GROUPS = {slugify(c): c for c in CATEGORIES}  # "smileys-emotion" -> "Smileys & Emotion"
LABELS = ("category", "subcategory")
PNG_SIZE = 64


@dataclass(frozen=True)
class Source:
    """One npm package of emoji art."""

    package: str
    version: str
    kind: str  # "png" or "svg"
    credit: str


SOURCES: Dict[str, Source] = {
    "google": Source("emoji-datasource-google", "16.0.0", "png",
                     "Noto Emoji artwork by Google, from npm emoji-datasource-google@16.0.0.\n"
                     "Licence: Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0).\n"
                     "Upstream: https://github.com/googlefonts/noto-emoji"),
    "twitter": Source("emoji-datasource-twitter", "16.0.0", "png",
                      "Twemoji artwork, Copyright 2020 Twitter, Inc and other contributors, from npm "
                      "emoji-datasource-twitter@16.0.0.\nLicence: CC-BY 4.0 "
                      "(https://creativecommons.org/licenses/by/4.0/). Images were composited on white "
                      "and resized."),
    "openmoji": Source("openmoji", "17.0.0", "svg",
                       "All emojis designed by OpenMoji - the open-source emoji and icon project "
                       "(https://openmoji.org), from npm openmoji@17.0.0.\nLicence: CC BY-SA 4.0 "
                       "(https://creativecommons.org/licenses/by-sa/4.0/). The PNGs here are adaptations "
                       "(rasterised, composited on white) and are shared under the same licence."),
    "twemoji": Source("@twemoji/svg", "15.0.0", "svg",
                      "Twemoji artwork, Copyright 2019 Twitter, Inc and other contributors, and the "
                      "jdecked/twemoji contributors, from npm @twemoji/svg@15.0.0.\nLicence: CC-BY 4.0 "
                      "(https://creativecommons.org/licenses/by/4.0/). Images were rasterised and "
                      "composited on white."),
}
METADATA_CREDIT = ("Labels (category, subcategory) from emoji.json of emoji-datasource 16.0.0, "
                   "Copyright Cal Henderson, MIT licence (https://github.com/iamcal/emoji-data).")


def codepoint_key(seq: str) -> str:
    """Normalised code-point sequence: lower-case hex without zero padding or FE0F (``"0023-FE0F-20E3"`` -> ``"23-20e3"``)."""
    parts = [int(p, 16) for p in seq.replace("_", "-").split("-") if p]
    return "-".join(f"{p:x}" for p in parts if p != 0xFE0F)


@dataclass(frozen=True)
class EmojiInfo:
    """Labels of one emoji (or one skin-tone variant) from ``emoji.json``."""

    category: str
    subcategory: str
    sort_order: int
    skin: bool
    image: str  # emoji-datasource PNG file name


@dataclass(frozen=True)
class Job:
    """One image to write: source bytes, their kind, the target file and its size."""

    data: bytes
    kind: str
    target: str
    size: int
    renderer: str


def parse_emoji_json(raw: bytes) -> Dict[str, EmojiInfo]:
    """Map code-point key -> labels for every emoji and skin-tone variant of ``emoji.json``."""
    out: Dict[str, EmojiInfo] = {}
    for e in json.loads(raw):
        base = dict(category=e["category"], subcategory=e["subcategory"], sort_order=int(e.get("sort_order", 0)))
        out[codepoint_key(e["unified"])] = EmojiInfo(skin=False, image=e["image"], **base)
        for var in (e.get("skin_variations") or {}).values():
            out.setdefault(codepoint_key(var["unified"]), EmojiInfo(skin=True, image=var["image"], **base))
    return out


def class_names_for(label: str, catalogue: Optional[Dict[str, EmojiInfo]],
                    openmoji_meta: Optional[List[dict]]) -> List[str]:
    """Ordered class names: the 9 categories, or the subcategories in Unicode order."""
    if label == "category":
        return list(CATEGORIES)
    if catalogue is not None:
        subs: Dict[str, int] = {}
        for info in catalogue.values():
            if info.category in CATEGORIES:
                subs[info.subcategory] = min(subs.get(info.subcategory, 1 << 30), info.sort_order)
        return sorted(subs, key=lambda s: subs[s])
    names: List[str] = []
    for e in openmoji_meta or []:
        if e.get("group") in OPENMOJI_GROUPS and e.get("subgroups") and e["subgroups"] not in names:
            names.append(e["subgroups"])
    return names


def _renderer(name: str) -> str:
    """Resolve ``auto`` to an installed SVG renderer; HMARError naming the pip command if none is."""
    import importlib.util
    have = {"resvg": importlib.util.find_spec("resvg_py") is not None,
            "cairosvg": importlib.util.find_spec("cairosvg") is not None}
    if name == "auto":
        for cand in ("resvg", "cairosvg"):
            if have[cand]:
                return cand
        raise HMARError("drawing SVG emoji needs resvg-py or cairosvg: pip install resvg-py==0.5.0 "
                        "(or pip install cairosvg==2.9.1), or use --sources google,twitter")
    if name not in have:
        raise HMARError(f"unknown SVG renderer {name!r}; choose auto, resvg or cairosvg")
    if not have[name]:
        pkg = "resvg-py==0.5.0" if name == "resvg" else "cairosvg==2.9.1"
        raise HMARError(f"SVG renderer {name} is not installed: pip install {pkg}")
    return name


def render_svg(data: bytes, size: int, renderer: str) -> Image.Image:
    """Draw SVG bytes to a ``size`` x ``size`` RGBA image."""
    if renderer == "resvg":
        import resvg_py
        png = bytes(resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=size, height=size))
    else:
        import cairosvg
        png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
    return Image.open(io.BytesIO(png))


def _run_job(job: Job) -> None:
    if job.kind == "svg":
        im = render_svg(job.data, job.size, job.renderer)
    else:
        im = Image.open(io.BytesIO(job.data))
    im = to_rgb(im)
    if im.size != (job.size, job.size):
        im = im.resize((job.size, job.size), Image.Resampling.LANCZOS)
    im.save(job.target)


def _package_licence(pkg: NpmPackage) -> str:
    names = ("LICENSE", "LICENSE.txt", "LICENSE.md", "license", "license.txt", "LICENCE")
    files = pkg.select(lambda r: r in names)
    return next((v.decode("utf-8", "replace") for _, v in sorted(files.items())), "")


def _items_png(source: str, pkg: NpmPackage, catalogue: Dict[str, EmojiInfo]
               ) -> Iterable[Tuple[str, EmojiInfo, bytes]]:
    prefix = f"img/{source}/{PNG_SIZE}/"
    files = pkg.select(lambda r: r.startswith(prefix) and r.endswith(".png"))
    for key, info in catalogue.items():
        data = files.get(prefix + info.image)
        if data is not None:
            yield key, info, data


def _items_twemoji(pkg: NpmPackage, catalogue: Dict[str, EmojiInfo]) -> Iterable[Tuple[str, EmojiInfo, bytes]]:
    files = pkg.select(lambda r: "/" not in r and r.endswith(".svg"))
    for rel, data in files.items():
        info = catalogue.get(codepoint_key(rel[:-4]))
        if info is not None:  # lone regional indicators and the like have no emoji.json entry
            yield codepoint_key(rel[:-4]), info, data


def _items_openmoji(pkg: NpmPackage, meta: List[dict], catalogue: Optional[Dict[str, EmojiInfo]],
                    sub_names: Dict[str, str]) -> Iterable[Tuple[str, EmojiInfo, bytes]]:
    files = pkg.select(lambda r: r.startswith("color/svg/") and r.endswith(".svg"))
    for e in meta:
        category = OPENMOJI_GROUPS.get(e.get("group", ""))
        data = files.get(f"color/svg/{e['hexcode']}.svg")
        if category is None or data is None:
            continue  # component, extras-openmoji, extras-unicode
        key = codepoint_key(e["hexcode"])
        sub = sub_names.get(slugify(e.get("subgroups", "")), "")
        order = catalogue[key].sort_order if catalogue and key in catalogue else (1 << 20) + int(e.get("order", 0))
        yield key, EmojiInfo(category, sub, order, bool(e.get("skintone")), ""), data


def default_sources(size: int) -> Tuple[str, ...]:
    """PNG art is 64 px: use it (plus OpenMoji) up to 64, and only the SVG sources above."""
    return ("google", "twitter", "openmoji") if size <= PNG_SIZE else ("openmoji", "twemoji")


def build_emoji(out: Path, source_dir: Optional[Path] = None, size: int = 64, label: str = "category",
                sources: Optional[Sequence[str]] = None, drop_skin_tones: bool = False,
                val_fraction: float = 0.05, limit_per_class: Optional[int] = None,
                renderer: str = "auto", workers: int = 1,
                progress: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, int]]:
    """Write the emoji image folders to ``out``; returns ``{split: {source: count}}``."""
    out = Path(out)
    sources = tuple(sources) if sources else default_sources(size)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise HMARError(f"unknown emoji source {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    if label not in LABELS:
        raise HMARError(f"unknown --label {label!r}; choose category or subcategory")
    if not 8 <= size <= 4096:
        raise HMARError(f"--size {size} is out of range; use 8 to 4096 (e.g. 32, 64 or 256)")
    if not 0.0 <= val_fraction < 1.0:
        raise HMARError(f"--val-fraction {val_fraction} must be in [0, 1)")
    png_sources = [s for s in sources if SOURCES[s].kind == "png"]
    if png_sources and size > PNG_SIZE:
        raise HMARError(f"sources {', '.join(png_sources)} are {PNG_SIZE} px PNGs and --size {size} would "
                        "upscale them; use --sources openmoji,twemoji for sizes above 64")
    say = progress or (lambda msg: None)
    packages = {s: find_package(SOURCES[s].package, SOURCES[s].version, source_dir) for s in sources}
    svg_renderer = _renderer(renderer) if any(SOURCES[s].kind == "svg" for s in sources) else ""

    # labels: emoji.json from whichever emoji-datasource package is present
    catalogue: Optional[Dict[str, EmojiInfo]] = None
    needs_catalogue = bool(png_sources) or "twemoji" in sources
    for s in ("google", "twitter"):
        pkg = packages.get(s)
        if pkg is None:
            try:
                pkg = find_package(SOURCES[s].package, SOURCES[s].version, source_dir)
            except HMARError:
                continue
        raw = pkg.read("emoji.json")
        if raw is not None:
            catalogue = parse_emoji_json(raw)
            break
    if catalogue is None and needs_catalogue:
        s = SOURCES["twitter"]
        raise HMARError(f"labels come from emoji.json of {s.package}@{s.version}, which was not found in "
                        f"{source_dir or Path.cwd()}; fetch it with: {pack_command(s.package, s.version)}")
    openmoji_meta: Optional[List[dict]] = None
    if "openmoji" in packages:
        raw = packages["openmoji"].read("data/openmoji.json")
        if raw is None:
            raise HMARError(f"{packages['openmoji'].location} has no data/openmoji.json; fetch it again with: "
                            f"{pack_command('openmoji', SOURCES['openmoji'].version)}")
        openmoji_meta = json.loads(raw)

    classes = class_names_for(label, catalogue, openmoji_meta)
    class_index = {name: i for i, name in enumerate(classes)}
    sub_names = {slugify(n): n for n in classes} if label == "subcategory" else {}

    entries: List[Tuple[int, str, str, EmojiInfo, bytes]] = []  # (order, source, key, info, data)
    for s in sources:
        say(f"reading {SOURCES[s].package} from {packages[s].location}")
        if SOURCES[s].kind == "png":
            items = _items_png(s, packages[s], catalogue or {})
        elif s == "twemoji":
            items = _items_twemoji(packages[s], catalogue or {})
        else:
            items = _items_openmoji(packages[s], openmoji_meta or [], catalogue, sub_names)
        for key, info, data in items:
            entries.append((info.sort_order, s, key, info, data))
    entries.sort(key=lambda t: (t[0], t[2], t[1]))

    jobs: List[Job] = []
    counts: Dict[str, Dict[str, int]] = {"train": {}, "val": {}}
    taken: Dict[int, int] = {}
    folders = [class_dir_name(i, n, len(classes)) for i, n in enumerate(classes)]
    for _, s, key, info, data in entries:
        if drop_skin_tones and info.skin:
            continue
        name = info.category if label == "category" else info.subcategory
        cls = class_index.get(name)
        if cls is None:
            continue  # Component, or a subgroup outside the 9 categories
        if limit_per_class is not None and taken.get(cls, 0) >= limit_per_class:
            continue
        taken[cls] = taken.get(cls, 0) + 1
        split = split_for_key(key, val_fraction)
        target = out / split / folders[cls] / f"{s}_{key}.png"
        jobs.append(Job(data, SOURCES[s].kind, str(target), size, svg_renderer))
        counts[split][s] = counts[split].get(s, 0) + 1

    if not jobs:
        raise HMARError(f"no emoji images selected from sources {', '.join(sources)}; "
                        "check the packages and the options")
    licences = [SOURCES[s].credit for s in sources]
    if needs_catalogue or label == "subcategory":
        licences.append(METADATA_CREDIT)
    texts = "\n\n".join(licences)
    for s in sources:
        full = _package_licence(packages[s])
        if full:
            texts += f"\n\n{'=' * 72}\nLicence file shipped in {SOURCES[s].package}@{SOURCES[s].version}:\n\n{full}"
    write_metadata(out, classes, "Emoji images built by hmar from these sources:\n\n" + texts)

    for split in counts:
        clear_class_folders(out / split)
    for folder in sorted({Path(job.target).parent for job in jobs}):
        folder.mkdir(parents=True, exist_ok=True)
    say(f"writing {len(jobs)} images at {size} px with {max(1, workers)} worker(s)")
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_run_job, jobs, chunksize=32))
    else:
        for job in jobs:
            _run_job(job)
    return counts
