"""Helpers of the Fashion-MNIST study (scripts/gpu_fmnist_study.sh), each a small subcommand:

  recon   TOKENIZER DATA/test OUT/   reconstruct every test image through the tokenizer (PNG folder with the
                                     same class sub-folders) and print PSNR and per-scale codebook usage as JSON
  subset  DATA/train N OUT/          copy the first N/classes images of each class (the real-data floor)
  table   RESULTS_DIR                collect every */metrics.json into a Markdown table
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # hmar from this checkout, installed or not


def recon(tok_dir: str, test_dir: str, out: str) -> None:
    from hmar.training.tokenizer_io import load_tokenizer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(tok_dir).to(dev).eval()
    R = tok.config.resolution
    files = sorted(p for p in Path(test_dir).rglob("*.png"))
    hits = torch.zeros(len(tok.patch_nums), tok.config.vocab_size)
    se, n = 0.0, 0
    for i in range(0, len(files), 500):
        chunk = files[i:i + 500]
        x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((R, R))) for f in chunk])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1
        with torch.no_grad():
            idx = tok.img_to_indices(x)
            y = tok.indices_to_img(idx)
        for s, t in enumerate(idx):
            hits[s] += torch.bincount(t.flatten().cpu(), minlength=hits.shape[1]).float()
        se += ((y - x) ** 2).mean(dim=(1, 2, 3)).sum().item()
        n += len(chunk)
        y8 = ((y + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        for f, im in zip(chunk, y8):
            dst = Path(out) / f.relative_to(test_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(dst)
    mse = se / n  # images in [-1, 1]: PSNR against a peak-to-peak of 2
    print(json.dumps({"images": n, "psnr_db": round(10 * np.log10(4 / mse), 3),
                      "codebook_usage_pct_per_scale": [round(100 * float((h > 0).float().mean()), 2) for h in hits]}))


def subset(train_dir: str, n: str, out: str) -> None:
    classes = sorted(p for p in Path(train_dir).iterdir() if p.is_dir())
    per = int(n) // len(classes)
    for c in classes:
        (Path(out) / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.glob("*.png"))[:per]:
            shutil.copy(f, Path(out) / c.name / f.name)
    if (Path(train_dir) / "../classes.json").exists():
        shutil.copy(Path(train_dir) / "../classes.json", Path(out) / "classes.json")


def table(results: str) -> None:
    rows = []
    for m in sorted(Path(results).glob("*/metrics.json")):
        r = json.loads(m.read_text())
        rows.append((m.parent.name, r.get("metrics", r)))
    keys = ["fid", "precision", "recall", "class_acc", "classifier_fd", "num_samples", "num_reference"]
    print("| set | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, r in rows:
        vals = [(f"{r[k]:.0f}" if k.startswith("num") else f"{r[k]:.4g}") if isinstance(r.get(k), (int, float))
                else "-" for k in keys]
        print(f"| {name} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    {"recon": recon, "subset": subset, "table": table}[sys.argv[1]](*sys.argv[2:])
