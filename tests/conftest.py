"""Shared fixtures: tiny random models, the golden-vector folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# `make test` runs this suite in pytest-xdist workers (-n 2): each worker gets its share of the cores, in torch
# (the fixture below) and, through OMP_NUM_THREADS set before torch is imported, in the worker's own OpenMP pool
# and in every process a test starts (a CLI run, torchrun ranks, a benchmark script). Two processes of 2 threads
# each on 2 cores spin against each other in OpenMP barriers and run many times slower (seen here: a 7 s test took 117 s).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // XDIST_WORKERS))
if XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import torch  # noqa: E402

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Without CUDA the Triton kernels' tests (test_draw_kernel.py, test_triton_attention.py) run in Triton's CPU
    # interpreter: they set TRITON_INTERPRET=1 when imported and re-import their kernel modules. Triton's own
    # library (tl.sum, tl.max, ...) is decorated once, when triton is first imported, for the interpreter only if
    # the variable is set then; a test module collected before them that imports triton leaves it compiled-only,
    # and every interpreted kernel fails ("Cannot call @triton.jit'd outside of the scope of a kernel": 89 failures
    # at 9d3b061, when hmar.model.fp8 imported triton with hmar.accel; it now imports it with its first fp8 layer).
    # So triton is first imported here, under the interpreter, and the variable is restored: hmar's modules see it
    # as before.
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except Exception:  # not installed: those tests skip
        pass
    finally:
        if _prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prev

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def golden_dir() -> Path:
    return Path(os.environ.get("HMAR_GOLDEN_DIR") or SHARED / "compat" / "golden")


def compat_dir() -> Path:
    return SHARED / "compat"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture
def tiny():
    """(hmar, var, nsp, tokenizer): random tiny models in eval mode, fp32."""
    from hmar import VQVAE, build_model, model_config, tokenizer_config
    torch.manual_seed(0)
    models = {k: build_model(model_config(f"{k}-tiny")).eval() for k in ("hmar", "var", "nsp")}
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    return models["hmar"], models["var"], models["nsp"], tok


def check_compiled_blocks_graphs(m) -> None:
    """``hmar.accel.compile_blocks`` on ``m`` (a 5-block, 2-head hmar-tiny with non-zero modulations): the eager
    logits to fp32 rounding at scale sizes 1, 4, 9 and 16, and 3 graphs for the one-token size, then 3 more for all
    the others (the first block, the blocks adding the branch before, the head)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hmar.accel import compile_blocks
    dev = m.device
    pre = m.precompute_condition(m.class_emb(torch.tensor([0, 1, 2], device=dev)))
    xs = {n: torch.randn(3, n, m.config.embed_dim, device=dev) for n in (1, 4, 9, 16)}
    with torch.no_grad():
        want = {n: (m.next_scale_logits(x, pre), m.masked_logits(x, pre)) for n, x in xs.items()}
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(m)
        graphs = []
        for n, x in xs.items():
            torch.testing.assert_close(m.next_scale_logits(x, pre), want[n][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.masked_logits(x, pre), want[n][1], atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [3, 6, 6, 6], graphs
