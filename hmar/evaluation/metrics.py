"""One call that scores a folder of generated samples: FID, precision/recall, classifier accuracy and FD."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from ..datasets.folder import GRID_FILE, ImageFolder, load_image_folder
from ..errors import HMARError
from .classifier import ClassifierExtractor, load_classifier
from .features import Extractor, extract_features
from .fid import ReferenceStats, load_stats, reference_stats
from .generate import SETTINGS_FILE
from .inception import load_inception
from .prdc import precision_recall


def _reference(reference: Union[str, Path], extractors: List[Extractor], cache_dir: Optional[Path],
               batch_size: int, progress: Optional[Callable[[str], None]]) -> Dict[str, ReferenceStats]:
    ref = Path(reference)
    if ref.suffix.lower() == ".npz":
        bundle = load_stats(ref)
        missing = [e.name for e in extractors if e.name not in bundle]
        if missing:
            raise HMARError(f"{ref} has no statistics for {missing[0]!r} (it holds {sorted(bundle)}); recreate it "
                            "with `hmar eval-reference` using the same --inception/--classifier, or pass the "
                            "reference image folder")
        return bundle
    say = progress or (lambda msg: None)
    say(f"reference statistics of {ref} (cached in {cache_dir})" if cache_dir else f"reference statistics of {ref}")
    return reference_stats(ref, extractors, cache_dir, batch_size,
                           progress=lambda n: say(f"  reference: {n} images") if n % (batch_size * 20) == 0 else None)


def _samples(root: Path, class_names: Optional[List[str]], say: Callable[[str], None]) -> ImageFolder:
    """The sample images of ``root`` with their classes. A folder that ``hmar generate`` wrote (its ``generate.json``)
    holds ``<class index>/`` folders whatever the class names are; ``hmar sample``'s ``grid.png`` is left out."""
    samples = load_image_folder(root, class_names, by_index=(root / SETTINGS_FILE).is_file())
    keep = [i for i, f in enumerate(samples.files) if not (f.parent == root and f.name == GRID_FILE)]
    if len(keep) < len(samples.files):
        say(f"note: {root / GRID_FILE} is the contact sheet of `hmar sample`, not a sample: left out")
        samples = ImageFolder([samples.files[i] for i in keep], [samples.labels[i] for i in keep],
                              samples.class_names)
    return samples


def _check_count(what: str, where: Union[str, Path], n: int, k: int) -> None:
    """Fail before the slow feature pass when a set is too small: FID needs 2 images, the k-NN manifolds
    of precision/recall more than ``k``."""
    if n < max(2, k + 1):
        need = "FID needs at least 2" if n < 2 else f"precision/recall with --k {k} need more than {k}"
        raise HMARError(f"{what} {where} has {n} image(s); {need}: use more images"
                        + (" or a smaller --k" if n >= 2 else ""))


def evaluate_folder(samples_dir: Union[str, Path], reference: Union[str, Path],
                    classifier: Optional[Union[str, Path, ClassifierExtractor]] = None,
                    inception: Optional[Union[str, Path, Extractor]] = None, use_inception: bool = True,
                    batch_size: int = 50, device: str = "cpu", cache_dir: Optional[Path] = None, k: int = 3,
                    progress: Optional[Callable[[str], None]] = None) -> Dict[str, Optional[float]]:
    """Score ``samples_dir/<class index or name>/*.png`` against a reference folder or ``.npz`` bundle.

    Returns ``fid``, ``precision``, ``recall``, ``density``, ``coverage`` (Inception features),
    ``class_acc`` and ``classifier_fd`` (classifier given), ``num_samples``, ``num_reference``.
    A metric that cannot be computed (no classifier, no reference features) is ``None``.
    ``inception`` is a weights path (default: see :func:`load_inception`) or a ready extractor.
    """
    say = progress or (lambda msg: None)
    extractors: List[Extractor] = []
    inc: Optional[Extractor] = None
    if use_inception:
        inc = load_inception(inception, device) if inception is None or isinstance(inception, (str, Path)) else inception
        extractors.append(inc)
    cls: Optional[ClassifierExtractor] = None
    if classifier is not None:
        cls = classifier if isinstance(classifier, ClassifierExtractor) else load_classifier(classifier, device)
        extractors.append(cls)
    if not extractors:
        raise HMARError("nothing to compute: enable the Inception metrics or pass --classifier")

    samples = _samples(Path(samples_dir), cls.cfg.class_names if cls is not None else None, say)
    say(f"{len(samples)} samples in {samples_dir}")
    _check_count("samples folder", samples_dir, len(samples), k if inc is not None else 1)
    refs = _reference(reference, extractors, cache_dir, batch_size, progress)
    if inc is not None and refs[inc.name].features is not None:
        _check_count("reference", reference, refs[inc.name].count, k)
    feats = extract_features(samples.files, extractors, batch_size,
                             progress=lambda n: say(f"  samples: {n} images") if n % (batch_size * 20) == 0 else None)
    result: Dict[str, Optional[float]] = {"fid": None, "precision": None, "recall": None, "density": None,
                                          "coverage": None, "class_acc": None, "classifier_fd": None,
                                          "num_samples": float(len(samples)), "num_reference": None}
    for ext, f in zip(extractors, feats):
        ref = refs[ext.name]
        mine = ReferenceStats.from_features(f, ext.name, keep_features=False)
        if ext is inc:
            result["fid"] = mine.fid(ref)
            result["num_reference"] = float(ref.count)
            if ref.features is not None:
                result.update(precision_recall(ref.features.astype(np.float32), f, k=k, device=device))
            else:
                say("reference statistics hold no features: precision/recall skipped")
        else:
            result["classifier_fd"] = mine.fid(ref)
            labels = np.asarray(samples.labels)
            known = labels >= 0
            if known.any():
                pred = cls.logits_from_features(f[known]).argmax(1).cpu().numpy()  # type: ignore[union-attr]
                result["class_acc"] = float((pred == labels[known]).mean())
            if result["num_reference"] is None:
                result["num_reference"] = float(ref.count)
    return result
