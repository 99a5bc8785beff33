"""Training data: image folders (PIL only), token caches, and the deterministic sharded batch order.

Randomness never comes from a global RNG here: the order of an epoch is a permutation seeded by
``(seed, epoch)``, and a sample's crop / flip / cached view is drawn from an RNG keyed by
``(seed, epoch, index)``. So the batches of a run are a pure function of (seed, epoch, batch index):
resuming mid-epoch, changing ``--workers`` or the number of processes gives the same global batches.

Corrupt files are detected when loaded (``__getitem__``), not by a pre-scan (which would read every
file of a large data set at start-up): the sample is replaced deterministically by the next readable
index, and the bad path travels with the batch so the trainer warns once per file and counts them.
"""
from __future__ import annotations

import json
import math
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..datasets.folder import (IMAGE_EXTENSIONS, class_name_index, folder_class_index, list_images, load_image_folder,
                               read_class_names, to_rgb, upright)
from ..errors import HMARError
from ..fileio import atomic_path

CACHE_FORMAT = "hmar-token-cache"
CACHE_VERSION = 1
VAL_DIRS = ("val", "validate", "validation", "test")
"""Names of the validation split next to ``ROOT/train``, first match wins: ``test`` (Fashion-MNIST's held-out split,
as ``hmar data fashion-mnist`` writes it) serves when there is no ``val``."""
Key = Union[int, Tuple[int, int]]


def keyed_rng(*key: int) -> np.random.Generator:
    """A NumPy generator that depends only on ``key`` (e.g. ``(seed, epoch, index, purpose)``)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


# ------------------------------------------------------------------------------------ transforms
def mid_size(resolution: int) -> int:
    """The shorter side before cropping: ``round(1.125 * R)`` (official ``mid_reso``)."""
    return round(1.125 * resolution)


def load_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB (alpha composited on white), turned upright by its EXIF orientation
    (a portrait photo from a camera is stored sideways). Raises on a corrupt file."""
    with Image.open(path) as im:
        return to_rgb(upright(im))   # upright() decodes the whole file first


def transform(im: Image.Image, resolution: int, train: bool, hflip: bool = False,
              rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """Shorter side to ``round(1.125 R)`` (Lanczos), random (train) or centre crop ``R``, optional flip,
    to a ``[3, R, R]`` float tensor in ``[-1, 1]``."""
    R, mid = resolution, mid_size(resolution)
    w, h = im.size
    s = mid / min(w, h)
    nw, nh = max(R, round(w * s)), max(R, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    if train:
        rng = rng if rng is not None else np.random.default_rng(0)
        left, top = int(rng.integers(0, nw - R + 1)), int(rng.integers(0, nh - R + 1))
        flip = hflip and bool(rng.integers(0, 2))
    else:
        left, top = int(round((nw - R) / 2.0)), int(round((nh - R) / 2.0))
        flip = False
    im = im.crop((left, top, left + R, top + R))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------ image folders
def find_splits(root: Union[str, Path]) -> Tuple[Path, Optional[Path]]:
    """``(train_dir, val_dir or None)``: ``ROOT/train`` (+ the first of ``ROOT/val``, ``validate``, ``validation``
    or ``test``: :data:`VAL_DIRS`) if present, else ``ROOT`` alone."""
    root = Path(root)
    if not root.exists():
        raise HMARError(f"data folder {str(root)!r} does not exist: pass a folder ROOT/<class>/*.png "
                        "(or ROOT/train/<class>/...)")
    if not root.is_dir():
        raise HMARError(f"{str(root)!r} is a file, not an image folder (token caches end in .safetensors)")
    if (root / "train").is_dir():
        val = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
        if val is not None and (root / "train").resolve() == val.resolve():
            raise HMARError(f"{val} and {root / 'train'} are the same folder: validating on the training images "
                            "measures nothing; give ROOT/val images of their own, or remove it")
        return root / "train", val
    return root, None


def index_folder(root: Path, class_names: Optional[Sequence[str]] = None) -> Tuple[List[Path], List[int], List[str]]:
    """``(files, labels, class_names)`` of ``root/<class>/*``.

    The classes follow :func:`hmar.datasets.folder.load_image_folder`'s rule, as in evaluation: a data set's
    ``classes.json`` (the layout of :mod:`hmar.datasets`), else index folders ``0 .. n-1`` (``7/``, ``07_sneaker/``),
    else the sorted class-folder names. ``class_names`` (e.g. the train split's, for the val split) fixes the
    mapping instead. Raises :class:`HMARError` for an empty folder and, without ``class_names``, for a class
    with no images.
    """
    files = list_images(root)
    if not files:
        raise HMARError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}: put them in "
                        "ROOT/<class name>/")
    if any(len(f.relative_to(root).parts) < 2 for f in files):
        raise HMARError(f"{root} has images outside class folders: put them in ROOT/<class name>/")
    if class_names is not None:   # a val split without classes.json: its folders must be training classes by name
        match = folder_class_index if read_class_names(root) is not None else class_name_index
        unknown = [d for d in sorted({f.relative_to(root).parts[0] for f in files})
                   if match(d, class_names) is None]
        if unknown:
            raise HMARError(f"class folder {root / unknown[0]} is not one of the training classes {list(class_names)}")
    folder = load_image_folder(root, class_names)   # the one folder -> class rule of evaluation too
    if class_names is None:   # the training split: every class needs images, or it cannot be learnt
        seen = set(folder.labels)
        missing = [n for c, n in enumerate(folder.class_names) if c not in seen]
        if missing:
            raise HMARError(f"class(es) {', '.join(repr(n) for n in missing)} of {root} have no images (no class "
                            "folder, or an empty one): add their images, or remove them from classes.json")
    return folder.files, folder.labels, folder.class_names


def _key(key: Key) -> Tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/*.{png,jpg,jpeg,webp,bmp}``; labels follow the sorted class folder names (or the
    data set's ``classes.json``). Items are dicts ``{"img", "label", "index", "bad"}``; index with
    ``(index, epoch)`` so that the augmentation depends on the epoch."""

    def __init__(self, root: Union[str, Path], resolution: int, train: bool = True, hflip: bool = False,
                 seed: int = 0, class_names: Optional[Sequence[str]] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise HMARError(f"data folder {str(self.root)!r} does not exist: pass a folder ROOT/<class>/*.png")
        self.files, self.labels, self.class_names = index_folder(self.root, class_names)
        self.resolution, self.train, self.hflip, self.seed = resolution, train, hflip, seed
        self._bad: Set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, epoch: int = 0) -> torch.Tensor:
        """The transformed image of ``index`` (raises on a corrupt file)."""
        rng = keyed_rng(self.seed, epoch, index, 1) if self.train else None
        return transform(load_rgb(self.files[index]), self.resolution, self.train, self.hflip, rng)

    def try_load(self, index: int, epoch: int = 0) -> Optional[torch.Tensor]:
        """Like :meth:`load` but ``None`` for an unreadable file."""
        if index in self._bad:
            return None
        try:
            return self.load(index, epoch)
        except Exception:  # any decoding failure: truncated, not an image, bomb, ...
            self._bad.add(index)
            return None

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        index, epoch = _key(key)
        bad: List[str] = []
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            img = self.try_load(j, epoch)
            if img is not None:
                return {"img": img, "label": self.labels[j], "index": index, "bad": bad}
            bad.append(str(self.files[j]))
        raise HMARError(f"none of the {n} images under {self.root} could be read")


# ------------------------------------------------------------------------------------ token caches
def is_token_cache(path: Union[str, Path, None]) -> bool:
    """True for a ``.safetensors`` file written by :func:`write_token_cache`."""
    return path is not None and Path(path).is_file() and Path(path).suffix == ".safetensors"


def quantizer_fingerprint(quantizer: torch.nn.Module) -> str:
    """A short hash of the codebook and phi convs: the weights the teacher-forcing inputs depend on."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(quantizer.state_dict().items()):
        if k.endswith("ema_vocab_hit_SV"):
            continue
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_token_cache(path: Union[str, Path], splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                      meta: Dict[str, Any]) -> Path:
    """Write ``{split: (indices [V, N, L], labels [N])}`` plus JSON metadata into one safetensors file
    (indices stored as int16 when the vocabulary allows)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = int(meta["vocab_size"]) <= 32767
    tensors = {}
    for name, (idx, lab) in splits.items():
        tensors[f"{name}_indices"] = idx.to(torch.int16 if small else torch.int32).contiguous()
        tensors[f"{name}_labels"] = lab.to(torch.int64).contiguous()
    m = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION),
         **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=m)
    return path


def _read_cache(path: Path, tensors: bool) -> Tuple[Dict[str, torch.Tensor], List[str], Dict[str, Any]]:
    """``(tensors or {}, tensor names, meta)`` of a token cache; without ``tensors`` only its header is read."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            names = list(f.keys())
            loaded = {k: f.get_tensor(k) for k in names} if tensors else {}
    except Exception as e:
        raise HMARError(f"{str(path)!r} is not a readable token cache ({e})") from None
    if raw.get("format") != CACHE_FORMAT:
        raise HMARError(f"{str(path)!r} is a safetensors file but not a token cache from `hmar tokenize`")
    return loaded, names, {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}


def read_token_cache_header(path: Union[str, Path]) -> Tuple[List[str], Dict[str, Any]]:
    """``(split names, meta)`` of a token cache, without loading its tokens."""
    _, names, meta = _read_cache(Path(path), tensors=False)
    return [k[: -len("_indices")] for k in names if k.endswith("_indices")], meta


def read_token_cache(path: Union[str, Path]) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], Dict[str, Any]]:
    """``(splits, meta)`` of a token cache (see :func:`write_token_cache`)."""
    tensors, _, meta = _read_cache(Path(path), tensors=True)
    splits = {}
    for k in tensors:
        if k.endswith("_indices"):
            name = k[: -len("_indices")]
            splits[name] = (tensors[k], tensors[f"{name}_labels"])
    return splits, meta


class TokenCacheDataset(torch.utils.data.Dataset):
    """Pre-computed token indices ``[V, N, L]`` (V augmented views per image); a training item uses a view
    drawn from ``(seed, epoch, index)``, an evaluation item view 0 (the centre crop)."""

    def __init__(self, indices: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], train: bool = True,
                 seed: int = 0):
        if indices.ndim == 2:
            indices = indices[None]
        self.indices, self.labels = indices, labels
        self.class_names = list(class_names)
        self.train, self.seed = train, seed
        if len(labels) == 0:
            raise HMARError("the token cache holds no samples")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        index, epoch = _key(key)
        views = self.indices.shape[0]
        v = int(keyed_rng(self.seed, epoch, index, 2).integers(0, views)) if self.train and views > 1 else 0
        return {"idx": self.indices[v, index].long(), "label": int(self.labels[index]), "index": index, "bad": []}


def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack tensors, keep the lists of bad files (and per-item validity flags for padded eval batches)."""
    out: Dict[str, Any] = {"label": torch.tensor([it["label"] for it in items], dtype=torch.long),
                           "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                           "bad": [b for it in items for b in it["bad"]]}
    for k in ("img", "idx"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out


# ------------------------------------------------------------------------------------ batch order
MAX_REPEATS = 8   # a global batch may hold each training sample at most this many times


def check_batch_fits(n: int, batch_size: int, data: Any, say: Callable[[str], None]) -> None:
    """A global batch larger than the training set repeats samples in each batch: a warning through ``say``; more
    than :data:`MAX_REPEATS` times the set (``--batch-size 100000`` on 8 images ran out of memory building the
    first batch) is an :class:`HMARError` naming the batch sizes that fit."""
    if batch_size > MAX_REPEATS * n:
        raise HMARError(f"--batch-size {batch_size} is more than {MAX_REPEATS}x the {n} training samples of {data}: "
                        f"each batch would repeat every sample over {batch_size // n} times; pass --batch-size {n} "
                        f"or less (or add data)")
    if batch_size > n:
        say(f"warning: --batch-size {batch_size} is larger than the {n} training samples of {data}: each batch "
            f"repeats samples; --batch-size {n} or less avoids it")


class EpochBatches(torch.utils.data.Sampler):
    """One epoch of THIS rank's batches of ``(index, epoch)`` keys, starting at batch ``start``.

    The global order is ``randperm(N)`` seeded by ``(seed, epoch)``, padded by wrapping around so that
    every global batch is full (``ceil(N / global_batch)`` batches per epoch); global batch ``b`` is split
    into ``world`` contiguous slices of ``global_batch / world``.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0,
                 shuffle: bool = True):
        if global_batch % world:
            raise HMARError(f"--batch-size {global_batch} is not divisible by the {world} processes")
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world
        self.local = global_batch // world
        self.epoch, self.start = epoch, start
        if shuffle:
            g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.batches_per_epoch(n, global_batch) * global_batch
        reps = math.ceil(total / n)
        self.order = perm.repeat(reps)[:total].tolist()

    @staticmethod
    def batches_per_epoch(n: int, global_batch: int) -> int:
        return math.ceil(n / global_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch(self.n, self.gb) - self.start

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for b in range(self.start, self.batches_per_epoch(self.n, self.gb)):
            lo = b * self.gb + self.rank * self.local
            yield [(i, self.epoch) for i in self.order[lo: lo + self.local]]


class EvalBatches(torch.utils.data.Sampler):
    """Contiguous evaluation shards, padded so every rank runs the same number of batches; a padded
    item is marked by index ``-1 - i`` (the caller weighs it 0)."""

    def __init__(self, n: int, local_batch: int, rank: int, world: int, max_batches: Optional[int] = None):
        per = math.ceil(n / (local_batch * world)) * local_batch
        if max_batches:
            per = min(per, max_batches * local_batch)
        self.items = [(i if i < n else -1 - (i % n)) for i in range(rank * per, (rank + 1) * per)]
        self.local = local_batch

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.local)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for b in range(0, len(self.items), self.local):
            yield [(i, 0) for i in self.items[b: b + self.local]]


class PaddedEval(torch.utils.data.Dataset):
    """Wraps a dataset for :class:`EvalBatches`: negative indices load a real item flagged ``valid=False``."""

    def __init__(self, ds: torch.utils.data.Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        i, _ = _key(key)
        item = dict(self.ds[(i if i >= 0 else -1 - i, 0)])
        item["index"] = i
        return item


def make_loader(ds: torch.utils.data.Dataset, batch_sampler: torch.utils.data.Sampler, workers: int,
                pin: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over explicit batches. It gets its own generator so that creating an iterator never
    draws from the global torch RNG (which would break bit-exact resumption). Its workers ignore SIGINT: Ctrl-C
    reaches the whole process group, and the trainer, not its workers, decides when to stop
    (:mod:`hmar.training.interrupt`)."""
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin, generator=torch.Generator().manual_seed(0),
                                       persistent_workers=False, worker_init_fn=_ignore_sigint if workers else None)


def _ignore_sigint(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class CorruptFiles:
    """Counts unreadable files met during training and warns once per file.

    Given the training ``dataset`` (an :class:`ImageFolderDataset`), it also raises :class:`HMARError` once every
    image of one class has turned out unreadable: such a class would get no sample at all, and the model would
    silently never learn it (each unreadable file is replaced by a readable one of another class). Pass it in a
    single-process run only: under DDP each rank meets only its share of the files, so one rank alone would
    raise while the others wait for it in a collective."""

    def __init__(self, say: Callable[[str], None], dataset: Optional[torch.utils.data.Dataset] = None):
        self.seen: Set[str] = set()
        self.say = say
        files, labels = getattr(dataset, "files", None), getattr(dataset, "labels", None)
        self._label = {str(f): int(c) for f, c in zip(files, labels)} if files is not None and labels is not None \
            else {}
        self._size = Counter(self._label.values())   # files per class
        self._bad: Counter = Counter()                  # unreadable files per class
        self._names = list(getattr(dataset, "class_names", []) or [])
        self._root = getattr(dataset, "root", None)

    def restore(self, paths: Sequence[str]) -> None:
        """The files a resumed run's checkpoint lists as unreadable: counted (and checked) as if met again, without
        their warnings, which the first run printed."""
        self.update(paths, warn=False)

    def update(self, paths: Sequence[str], warn: bool = True) -> None:
        for p in paths:
            if p in self.seen:
                continue
            self.seen.add(p)
            if warn:
                self.say(f"warning: skipping unreadable image {p} (replaced by another sample)")
            c = self._label.get(p)
            if c is None:
                continue
            self._bad[c] += 1
            if self._bad[c] == self._size[c]:
                name = self._names[c] if c < len(self._names) else str(c)
                raise HMARError(f"every image of class {name!r} ({self._size[c]} file(s) under {self._root}) is "
                                "unreadable, so the class cannot be learnt: replace its files with readable "
                                "images, or remove the class folder (and its entry in classes.json)")

    @property
    def count(self) -> int:
        return len(self.seen)


# ------------------------------------------------------------------------------------ building
@dataclass
class TrainData:
    """What the trainer needs to know about its data."""
    kind: str                                # "images" or "tokens"
    train: torch.utils.data.Dataset
    val: Optional[torch.utils.data.Dataset]
    class_names: List[str]
    meta: Dict[str, Any]                     # token cache metadata ({} for images)


def build_image_data(root: Union[str, Path], resolution: int, hflip: bool, seed: int) -> TrainData:
    """Train (random crops) and optional val (centre crops) splits of an image folder."""
    tr_dir, val_dir = find_splits(root)
    train = ImageFolderDataset(tr_dir, resolution, train=True, hflip=hflip, seed=seed)
    val = val_split(val_dir, resolution, seed, train.class_names)
    return TrainData("images", train, val, train.class_names, {})


def val_split(val_dir: Optional[Path], resolution: int, seed: int,
              class_names: Sequence[str]) -> Optional[ImageFolderDataset]:
    """The val split (centre crops, the training split's ``class_names``) of ``val_dir``; None for no folder or
    an empty one. A val split with images that cannot be used (e.g. a class the training split lacks) raises
    :class:`HMARError`: skipping it would silently drop the validation the user asked for."""
    if val_dir is None:
        return None
    try:
        return ImageFolderDataset(val_dir, resolution, train=False, seed=seed, class_names=class_names)
    except HMARError as e:
        if list_images(val_dir):
            raise HMARError(f"val split {val_dir}: {e} (give it class folders of the train split, or remove "
                            "it)") from None
        return None  # an empty val folder is not fatal


def build_cache_data(path: Union[str, Path], seed: int) -> TrainData:
    """Train and optional val splits of a token cache."""
    splits, meta = read_token_cache(path)
    if "train" not in splits:
        raise HMARError(f"token cache {str(path)!r} has no train split")
    names = meta.get("class_names") or []
    train = TokenCacheDataset(*splits["train"], names, train=True, seed=seed)
    val = TokenCacheDataset(*splits["val"], names, train=False, seed=seed) if "val" in splits else None
    return TrainData("tokens", train, val, names, meta)


def check_data_options(path: Optional[str], hflip: bool, eval_every: int) -> None:
    """Refuse, before a run directory is made, options the data cannot honour (they would be silently ignored):
    ``--hflip`` on a token cache whose views were encoded without flips (tokens cannot be flipped), and
    ``--eval-every N`` without a validation split."""
    if not path:
        return   # build_data says what is missing
    cache = is_token_cache(path)
    if cache and hflip:
        _, meta = read_token_cache_header(path)
        if not (meta.get("hflip") and int(meta.get("views", 1)) > 1):
            raise HMARError(f"--hflip cannot flip the tokens of the token cache {path} (made "
                            f"{'with' if meta.get('hflip') else 'without'} --hflip, {meta.get('views', 1)} view(s)): "
                            "re-run `hmar tokenize --hflip --views N` (N > 1) to store flipped views, train on the "
                            "image folder, or drop --hflip")
    if eval_every > 0 and not has_val_split(path):
        fix = ("re-run `hmar tokenize` on a folder of ROOT/train and ROOT/val (or ROOT/test)" if cache else
               "add images in ROOT/val/<class>/ (or validate/, validation/, test/) next to ROOT/train/")
        raise HMARError(f"--eval-every {eval_every} needs a validation split, but {path} has none: {fix}, or drop "
                        "--eval-every")


def has_val_split(path: Union[str, Path]) -> bool:
    """Whether training on ``path`` (an image folder or a token cache) gets a validation split."""
    if is_token_cache(path):
        return "val" in read_token_cache_header(path)[0]
    _, val_dir = find_splits(path)
    return val_dir is not None and bool(list_images(val_dir))


def check_cache_fits(meta: Dict[str, Any], splits: Dict[str, torch.utils.data.Dataset], patch_nums: Sequence[int],
                     vocab_size: int, path: str, fix: str) -> None:
    """Refuse a token cache whose tokens are not the model's: other scales (``patch_nums``), another number of
    tokens per image, another vocabulary. ``fix`` names what to re-run ``hmar tokenize`` with."""
    pn = tuple(int(p) for p in patch_nums)
    length = sum(p * p for p in pn)
    hint = f"re-run `hmar tokenize --data IMAGES --tokenizer {fix} --out NEW.safetensors` and train on the new cache"
    if meta.get("tokenizer_path"):
        hint += f" (this one was made with the tokenizer {meta['tokenizer_path']})"
    cached = meta.get("patch_nums")
    if cached is not None and tuple(int(p) for p in cached) != pn:
        raise HMARError(f"token cache {path} holds tokens of the scales {tuple(cached)} but the model uses {pn}: "
                        f"{hint}")
    for name, ds in splits.items():
        n = int(ds.indices.shape[-1])
        if n != length:
            raise HMARError(f"token cache {path} holds {n} tokens per image ({name} split) but the model's scales "
                            f"{pn} take {length}: {hint}")
    vocab = meta.get("vocab_size")
    if vocab is not None and int(vocab) != int(vocab_size):
        raise HMARError(f"token cache {path} holds tokens of a {vocab}-code vocabulary but the model has "
                        f"{vocab_size} codes: {hint}")


def build_data(path: Optional[str], resolution: int, hflip: bool, seed: int) -> TrainData:
    """An image folder or a token cache, by what ``path`` is."""
    if not path:
        raise HMARError("no training data: pass --data FOLDER (images) or --data CACHE.safetensors (hmar tokenize)")
    if is_token_cache(path):
        return build_cache_data(path, seed)
    return build_image_data(path, resolution, hflip, seed)
