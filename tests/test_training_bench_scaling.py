"""Smoke run of benchmarks/bench_scaling.py on the CPU (gloo): 1 process, then 2 with DDP and with FSDP2,
the table and the JSON, NVLink multicast switched off in every child."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_scaling_cpu_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), "--device", "cpu", "--preset",
                        "hmar-tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "| hmar-tiny | next-scale | 4 | fsdp | 2 |" in r.stdout
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [(x["mode"], x["gpus"]) for x in rows] == [("single", 1), ("ddp", 2), ("fsdp", 2)]
    for x in rows:
        assert "error" not in x, x
        assert x["env"]["NCCL_NVLS_ENABLE"] == "0" and x["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
        assert x["env"]["NVSHMEM_DISABLE_NVLS"] == "1" and x["env"]["OMP_NUM_THREADS"] == "1"
        assert x["img_per_s"] > 0 and x["peak_rss_gib"] > 0 and x["global_batch"] == 4 * x["gpus"]
        assert x["scaling_efficiency"] > 0
    # DDP and FSDP train the same model on the same per-rank batches: the same loss
    assert rows[1]["loss"] == pytest.approx(rows[2]["loss"], rel=1e-4)
