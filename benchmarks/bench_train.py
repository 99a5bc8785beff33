"""Training throughput of the transformer stages through the trainer's own step (``hmar.training.loop.train_step``):
random token indices and labels (no tokenizer encoder, no data loading), bf16 autocast on GPU, fused AdamW,
the official loss weighting and clipping.

    python benchmarks/bench_train.py                                  # hmar-d16 stage 1 and var-d16, batch 32
    python benchmarks/bench_train.py --preset hmar-d16 --stage masked --batch 32 --json out.json
    python benchmarks/bench_train.py --preset hmar-tiny --device cpu --steps 5   # smoke test

Prints images/s, ms/step and peak GPU memory per configuration; ``--json`` writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmar.model import HMAR, build_model, init_weights  # noqa: E402
from hmar.presets import ModelConfig, model_config  # noqa: E402
from hmar.tokenizer.quantizer import MultiScaleQuantizer  # noqa: E402
from hmar.training.distributed import DistInfo, resolve_device  # noqa: E402
from hmar.training.loop import prepare_training, train_step  # noqa: E402
from hmar.training.losses import draw_masks  # noqa: E402
from hmar.training.optim import apply_schedule  # noqa: E402


def build(preset: str, stage: str, device: torch.device) -> torch.nn.Module:
    """The model a run of ``hmar train --model PRESET --stage STAGE`` would train (random init)."""
    d = model_config(preset).to_dict()
    if stage == "next-scale" and d["kind"] == "hmar":
        d["kind"] = "nsp"
    if stage == "masked":
        d["kind"] = "nsp"
        nsp = build_model(ModelConfig.from_dict(d))
        init_weights(nsp)
        return HMAR.from_next_scale(nsp, model_config(preset).branch_depth if preset.startswith("hmar") else None)
    m = build_model(ModelConfig.from_dict(d))
    init_weights(m)
    return m


def bench(preset: str, stage: str, batch: int, steps: int, warmup: int, precision: str, fused: str, compile: bool,
          device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = build(preset, stage, device)
    cfg = model.config
    quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
    weighting = "uniform" if cfg.kind == "var" else "gaussian"
    st = prepare_training(model, quant, stage, DistInfo(device=device), loss_weight=weighting, precision=precision,
                          fused=fused, lr=3e-4, compile=compile)
    apply_schedule(st.optimizer, 3e-4, 0.05)
    L = cfg.seq_len
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, L), generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    mask = draw_masks([(0, 0, i) for i in range(batch)], cfg.patch_nums, device=device) if stage == "masked" else None
    cuda = device.type == "cuda"
    for _ in range(warmup):
        train_step(st, idx, labels, mask)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = train_step(st, idx, labels, mask)
    loss = float(out["loss"])                                   # synchronises
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = {"preset": preset, "stage": stage, "kind": cfg.kind, "batch": batch, "seq_len": L,
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "trained_params_m": round(sum(p.numel() for p in st.params) / 1e6, 2),
           "precision": str(st.amp_dtype).replace("torch.", "") if st.amp_dtype else "fp32",
           "fused_adamw": bool(st.optimizer.defaults.get("fused")), "compile": compile,
           "attention_backend": os.environ.get("HMAR_ATTN_BACKEND", "auto"),
           "ms_per_step": round(dt * 1000, 2), "img_per_s": round(batch / dt, 1), "loss": round(loss, 4),
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    if cuda:
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return res


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["hmar-d16", "var-d16"], help="model presets (default: hmar-d16 var-d16)")
    p.add_argument("--stage", default="next-scale", choices=["next-scale", "masked"], help="training stage")
    p.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused AdamW (auto: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    dev = resolve_device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    for preset in a.preset:
        r = bench(preset, a.stage, a.batch, a.steps, a.warmup, a.precision, a.fused, a.compile, dev)
        results.append(r)
        mem = f", peak {r['peak_mem_gib']} GiB" if "peak_mem_gib" in r else ""
        print(f"{preset:>10} {a.stage:<10} batch {a.batch}: {r['img_per_s']:8.1f} img/s  {r['ms_per_step']:8.2f} ms/step"
              f"{mem}  ({r['params_m']}M params, {r['trained_params_m']}M trained, {r['precision']}, "
              f"fused AdamW {r['fused_adamw']}, {r['device']})", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
