"""Smoke run of benchmarks/bench_scaling.py on the CPU (gloo): 1 process, then 2 with DDP and with FSDP2,
the table and the JSON, NVLink multicast switched off in every child; a launch that dies by SIGABRT with no
worker error (as gloo once did in CI) is launched again and recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# torchrun launches (2 gloo ranks each) run one at a time on one pytest-xdist worker (`make test` uses
# --dist loadgroup): two at once would put 4 ranks on the 2 cores, beside the other worker's tests
pytestmark = pytest.mark.xdist_group("torchrun")


def test_bench_scaling_cpu_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["HMAR_BENCH_ABORT_ONCE"] = str(tmp_path / "aborted")    # rank 1 of the first multi-process launch aborts
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), "--device", "cpu", "--preset",
                        "hmar-tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--json", str(out),
                        # the injected abort takes one retry; the rest cover a real teardown abort of gloo
                        # (it struck the retried launch once in CI, 2026-12-01)
                        "--retries", "3"],
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
    # the DDP configuration was launched again: the first launch's (injected) abort is kept, with rank 0's result
    # written; a real gloo teardown abort may add more entries of the same kind
    first = rows[1]["retried_after"][0]
    assert "SIGABRT" in first and "after rank 0 wrote its result" in first, first
    assert all("SIGABRT" in f for f in rows[1]["retried_after"])
    assert "retried_after" not in rows[0]                          # one process: never relaunched
    assert all("SIGABRT" in f for f in rows[2].get("retried_after", []))
    assert "run again after a failed first launch" in r.stdout
