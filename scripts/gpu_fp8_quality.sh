#!/usr/bin/env bash
# Sample-level check of the opt-in fp8 GEMMs (hmar.model.fp8) on the shipped default model, on one GPU: three sets
# of N images per class with `hmar generate` (bf16 --fast with seeds 0 and 1, --fp8 with seed 1), each packed as
# uint8 arrays into $OUT/<set>-0.npz and -1.npz (its two halves) for a Frechet distance on the CPU (the Inception
# weights do not travel):
#   python3 scripts/fp8_quality_fid.py $OUT/bf16-seed0-*.npz $OUT/bf16-seed1-*.npz $OUT/fp8-seed1-*.npz
#   (bf16 seed 0 against the other two: the fp8 set's distance next to the bf16-vs-bf16 floor at the same N)
set -euo pipefail
N=${N:-250}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for spec in "bf16-seed0 0 --fast" "bf16-seed1 1 --fast" "fp8-seed1 1 --fp8"; do
  set -- $spec
  echo "== $(date -u +%T) $1"
  python3 -m hmar generate --device cuda --per-class "$N" --seed "$2" "$3" --batch-size 256 --out "/tmp/fp8q/$1"
done
python3 - "$OUT" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
out = Path(sys.argv[1])
for d in sorted(Path("/tmp/fp8q").iterdir()):
    files = sorted(d.rglob("*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([f.parent.name for f in files])
    h = len(files) // 2     # two files a set: one of 2,250 images is 18.8 MB, above the 16 MiB a file that comes back
    for i, part in enumerate((slice(0, h), slice(h, None))):
        np.savez_compressed(out / f"{d.name}-{i}.npz", images=x[part], labels=labels[part])
    print(d.name, x.shape)
PY
