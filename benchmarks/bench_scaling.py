"""Multi-GPU training: throughput on 1 and N GPUs (DDP and FSDP2), scaling efficiency, peak memory per GPU.

Every configuration runs in its own processes: 1 GPU as a plain process (no process group, no wrapper: what
``hmar train`` does on one GPU), N GPUs under ``torchrun --nproc_per_node N`` with DDP and with FSDP2
(``--fsdp``). Each process trains the trainer's own step (``hmar.training.loop.prepare_training`` +
``train_step``: bf16 autocast on GPU, fused AdamW, gradient clipping) on random token indices, so data loading
and the tokenizer encoder are not measured. The batch is PER GPU (weak scaling: N GPUs train N x the images).

    python benchmarks/bench_scaling.py --json out.json           # all GPUs; hmar-d16 @ 32/GPU and hmar-d30 @ 16/GPU
    python benchmarks/bench_scaling.py --preset hmar-d30 --batch 16 --modes ddp fsdp --json d30.json
    python benchmarks/bench_scaling.py --device cpu --preset hmar-tiny --batch 4 --steps 2   # CPU smoke (gloo, 2 procs)

Reported per configuration: images/s (all GPUs), images/s per GPU, ms/step (slowest rank), scaling
efficiency = img/s on N GPUs / (N x img/s on 1 GPU), peak memory per GPU (``max_memory_allocated`` and
``max_memory_reserved``, largest over ranks, steady state after the warm-up steps) and the estimated
parameter + gradient + AdamW state memory per GPU (16 bytes per trained parameter; / N under FSDP).

The trainer's defaults apply (as in ``hmar train``); ``HMAR_ATTN_BACKEND`` in the environment forces an
attention backend in every child.

NVLink SHARP / multicast stays off: ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1`` are exported here and in every child's environment (and recorded in the JSON).
"""
from __future__ import annotations

import os

# before torch (and NCCL) is loaded, in this process and (through os.environ) in every child
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = ("single", "ddp", "fsdp")


# ------------------------------------------------------------------------------------ one configuration
def _build(preset: str, stage: str, device: torch.device) -> torch.nn.Module:
    """What ``hmar train --model PRESET --stage STAGE`` trains (random init), built on ``device``."""
    from hmar.model import HMAR, build_model, init_weights
    from hmar.presets import model_config
    with torch.device(device):
        m = build_model(model_config(preset).stage_one())   # stage 1 of HMAR: the next-scale model, as the trainer
        init_weights(m)
        if stage == "masked":
            m = HMAR.from_next_scale(m, model_config(preset).branch_depth if preset.startswith("hmar") else None)
    return m


def _peak_rss_gib() -> float:
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    return kb / 2 ** 20


def worker(a: argparse.Namespace) -> int:
    """One configuration in this process (rank ``RANK`` of ``WORLD_SIZE`` under torchrun); rank 0 writes
    ``a.result``; a rank that fails writes ``a.result.rankR`` and exits at once (the others would wait)."""
    import torch.distributed as dist
    from hmar.tokenizer.quantizer import MultiScaleQuantizer
    from hmar.training.distributed import all_gather_object, all_reduce_max, barrier, init_distributed
    from hmar.training.loop import prepare_training, train_step
    from hmar.training.losses import draw_masks
    from hmar.training.optim import apply_schedule
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = a.device.startswith("cuda")
    if world > 1 and not dist.is_initialized():
        # our own (short) timeout: a rank that dies must not leave the others waiting for 30 minutes
        kw: Dict[str, Any] = {}
        if cuda:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(dev)
            kw["device_id"] = dev
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=a.pg_timeout), **kw)
    info = init_distributed(a.device)
    dev = info.device
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        torch.manual_seed(0)
        model = _build(a.preset, a.stage, dev)
        cfg = model.config
        quant = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums).to(dev)
        n_params = sum(p.numel() for p in model.parameters())
        st = prepare_training(model, quant, a.stage, info, loss_weight="uniform" if cfg.kind == "var" else "gaussian",
                              precision=a.precision, fused=a.fused, lr=3e-4, fsdp=a.mode == "fsdp",
                              compile=a.compile)
        apply_schedule(st.optimizer, 3e-4, 0.05)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        g = torch.Generator().manual_seed(1000 + info.rank)          # each rank its own (random) tokens
        idx = torch.randint(0, cfg.vocab_size, (a.batch, cfg.seq_len), generator=g).to(dev)
        labels = torch.randint(0, cfg.num_classes, (a.batch,), generator=g).to(dev)
        mask = (draw_masks([(0, 0, info.rank * a.batch + i) for i in range(a.batch)], cfg.patch_nums, device=dev)
                if a.stage == "masked" else None)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            train_step(st, idx, labels, mask)
        sync()
        warm_s = time.perf_counter() - t0
        mem_warm = torch.cuda.max_memory_allocated() if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        barrier(info)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            out = train_step(st, idx, labels, mask)
        loss = float(out["loss"])                                       # waits for the last step
        sync()
        dt = all_reduce_max((time.perf_counter() - t0) / a.steps, info)  # the slowest rank sets the pace
        mem = {"allocated": torch.cuda.max_memory_allocated() / 2 ** 30,
               "reserved": torch.cuda.max_memory_reserved() / 2 ** 30,
               "warmup_allocated": mem_warm / 2 ** 30} if cuda else {"rss": _peak_rss_gib()}
        mems = all_gather_object(mem, info)
    except Exception as e:  # noqa: BLE001 - OOM and the like: report, do not hang the other ranks
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        Path(f"{a.result}.rank{rank}").write_text(json.dumps(
            {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", "oom": oom}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    world_batch = a.batch * info.world
    res: Dict[str, Any] = {
        "preset": a.preset, "stage": a.stage, "kind": cfg.kind, "mode": a.mode, "gpus": info.world,
        "batch_per_gpu": a.batch, "global_batch": world_batch, "seq_len": cfg.seq_len,
        "params_m": round(n_params / 1e6, 2), "trained_params_m": round(trained / 1e6, 2),
        "precision": str(st.amp_dtype).replace("torch.", "") if st.amp_dtype else "fp32",
        "fused_adamw": bool(st.optimizer.defaults.get("fused")), "compile": a.compile,
        "chunked_ce": getattr(st, "chunked_ce", None),            # the trainer's defaults (as `hmar train`)
        "steps": a.steps, "warmup": a.warmup, "warmup_s": round(warm_s, 2),
        "ms_per_step": round(dt * 1000, 2), "img_per_s": round(world_batch / dt, 2),
        "img_per_s_per_gpu": round(a.batch / dt, 2), "loss": round(loss, 4),
        "state_gib_per_gpu_est": round(trained * 16 / 2 ** 30 / (info.world if a.mode == "fsdp" else 1)
                                       + (n_params - trained) * 4 / 2 ** 30, 3),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "env": {k: os.environ.get(k) for k in (*NO_MULTICAST, "OMP_NUM_THREADS", "HMAR_ATTN_BACKEND")},
    }
    if cuda:
        res["peak_alloc_gib"] = round(max(m["allocated"] for m in mems), 2)
        res["peak_reserved_gib"] = round(max(m["reserved"] for m in mems), 2)
        res["peak_alloc_gib_warmup"] = round(max(m["warmup_allocated"] for m in mems), 2)
        res["peak_alloc_gib_per_rank"] = [round(m["allocated"], 2) for m in mems]
    else:
        res["peak_rss_gib"] = round(max(m["rss"] for m in mems), 3)
    if info.is_main:
        Path(a.result).write_text(json.dumps(res))
    if info.initialized:
        dist.barrier()
        marker = os.environ.get("HMAR_BENCH_ABORT_ONCE")   # tests: rank 1 aborts once here, as gloo's did in CI
        if marker and rank == 1 and not Path(marker).exists():
            Path(marker).touch()
            os.abort()
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------ the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: str) -> Dict[str, str]:
    """This environment with multicast off, no torchrun variables of an outer launcher, and (CPU) one
    thread per process so that 1 and N processes compare like 1 and N devices."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(NO_MULTICAST)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONFAULTHANDLER"] = "1"   # a rank that aborts prints the Python stack of every thread
    if not device.startswith("cuda"):
        env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(a: argparse.Namespace, cmd: List[str], result: Path) -> tuple:
    """Run one launcher command; returns (exit status or a timeout note, its output)."""
    result.unlink(missing_ok=True)
    try:
        p = subprocess.run(cmd, env=child_env(a.device), capture_output=True, text=True, timeout=a.timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        return f"timeout after {a.timeout:.0f} s", "".join(text)


def run_one(a: argparse.Namespace, preset: str, batch: int, mode: str, nproc: int, tmp: Path) -> Dict[str, Any]:
    """One configuration in fresh processes. A multi-process run whose launcher failed with no error reported by
    any worker (a rank aborted by SIGABRT at interpreter exit, seen in CI; workers now end by ``exit_process``, so
    this is the fallback) is launched again, at most ``--retries`` times; the result then lists the failed launches
    (``retried_after``)."""
    result = tmp / f"{preset}-{a.stage}-{batch}-{mode}-{nproc}.json"
    args = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--preset", preset,
            "--batch", str(batch), "--mode", mode, "--stage", a.stage, "--device", a.device,
            "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--precision", a.precision, "--fused", a.fused, "--pg-timeout", str(a.pg_timeout),
            *(["--compile"] if a.compile else [])]
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                    "--master_addr", "127.0.0.1"]
    base = {"preset": preset, "stage": a.stage, "mode": mode, "gpus": nproc, "batch_per_gpu": batch}
    failures: List[str] = []
    t0 = time.time()
    for _ in range(1 + (a.retries if nproc > 1 else 0)):
        for f in tmp.glob(result.name + ".rank*"):
            f.unlink()
        port = ["--master_port", str(_free_port())] if launch else []        # a fresh port for every launch
        rc, log = _launch(a, [sys.executable, *launch, *port, *args], result)
        wall = round(time.time() - t0, 1)
        if rc == 0 and result.exists():
            out = {**json.loads(result.read_text()), "wall_s": wall}
            if failures:
                out["retried_after"] = failures
            return out
        errs = [json.loads(f.read_text()) for f in sorted(tmp.glob(result.name + ".rank*"))]
        if errs:       # a worker reported an error (OOM, a bug): running it again would not help
            return {**base, "wall_s": wall, "error": errs[0]["error"], "oom": any(e.get("oom") for e in errs)}
        failures.append(f"exit {rc}" + (" after rank 0 wrote its result" if result.exists() else "") + ": "
                        + " | ".join(log.strip().splitlines()[-12:])[-1500:])
        if isinstance(rc, str):  # a timeout is not retried
            break
    return {**base, "wall_s": round(time.time() - t0, 1), "error": failures[-1], "failures": failures, "oom": False}


def efficiency(results: List[Dict[str, Any]]) -> None:
    """Add ``scaling_efficiency`` (N-GPU img/s over N x the 1-GPU img/s of the same preset and batch)."""
    single = {(r["preset"], r["batch_per_gpu"]): r["img_per_s"] for r in results
              if r["mode"] == "single" and "img_per_s" in r}
    for r in results:
        one = single.get((r["preset"], r["batch_per_gpu"]))
        if one and "img_per_s" in r:
            r["scaling_efficiency"] = round(r["img_per_s"] / (r["gpus"] * one), 3)


def table(results: List[Dict[str, Any]], cuda: bool) -> str:
    mem = "peak alloc / reserved GiB per GPU" if cuda else "peak RSS GiB per proc"
    rows = [f"| model | stage | batch/GPU | mode | GPUs | img/s | img/s/GPU | ms/step | scaling eff. | {mem} | "
            "states GiB/GPU (est.) |", "|" + "---|" * 11]
    for r in results:
        if "error" in r:
            what = "OOM" if r.get("oom") else "failed"
            rows.append(f"| {r['preset']} | {r['stage']} | {r['batch_per_gpu']} | {r['mode']} | {r['gpus']} | {what} "
                        "| | | | | |")
            continue
        m = f"{r['peak_alloc_gib']} / {r['peak_reserved_gib']}" if cuda else f"{r['peak_rss_gib']}"
        eff = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        rows.append(f"| {r['preset']} | {r['stage']} | {r['batch_per_gpu']} | {r['mode']} | {r['gpus']} | "
                    f"{r['img_per_s']:.1f} | {r['img_per_s_per_gpu']:.1f} | {r['ms_per_step']:.1f} | {eff} | {m} | "
                    f"{r['state_gib_per_gpu_est']} |")
    return "\n".join(rows)


def default_batch(preset: str) -> int:
    """32 images per GPU up to depth 16 (bench_train's batch), 16 above (hmar-d30: see BENCHMARKS.md section 6)."""
    import re
    m = re.search(r"-d(\d+)", preset)
    return 16 if m and int(m.group(1)) > 16 else 32


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["hmar-d16", "hmar-d30"],
                   help="model presets (default: hmar-d16 hmar-d30)")
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help="batch PER GPU, one per preset or one for all (default: 32 for d16 and smaller, 16 above)")
    p.add_argument("--stage", default="next-scale", choices=["next-scale", "masked"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="default: single ddp fsdp")
    p.add_argument("--nproc", type=int, default=None, help="N (default: every visible GPU; 2 on the CPU)")
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo; smoke runs)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--fused", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is killed")
    p.add_argument("--pg-timeout", type=float, default=300, help="process-group timeout in seconds")
    p.add_argument("--retries", type=int, default=1,
                   help="re-runs of a multi-process configuration whose launcher died by a signal with no worker "
                        "error (default 1; recorded as retried_after)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results (and the table) here")
    # internal: one configuration in this process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="single", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:   # one process of a launch: it ends without interpreter shutdown, where gloo could abort it
        a.preset, a.batch = a.preset[0], a.batch[0]
        from hmar.training.distributed import exit_process
        exit_process(worker(a))
    if "WORLD_SIZE" in os.environ:
        p.error("run the driver as a plain process: it launches torchrun itself")
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --device cpu for a smoke run)")
    n = a.nproc or (torch.cuda.device_count() if cuda else 2)
    if n < 2 and any(m != "single" for m in a.modes):
        p.error(f"DDP/FSDP need at least 2 processes, have {n}")
    batches = a.batch or [default_batch(pr) for pr in a.preset]
    if len(batches) == 1:
        batches = batches * len(a.preset)
    if len(batches) != len(a.preset):
        p.error("--batch takes one value or one per preset")
    results: List[Dict[str, Any]] = []
    flags = " ".join(f"{k}={v}" for k, v in NO_MULTICAST.items())
    print(f"{n} x {torch.cuda.get_device_name(0) if cuda else 'cpu'}; {flags}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for preset, batch in zip(a.preset, batches):
            for mode in a.modes:
                nproc = 1 if mode == "single" else n
                r = run_one(a, preset, batch, mode, nproc, Path(tmp))
                results.append(r)
                if "error" in r:
                    print(f"{preset} {mode} x{nproc} batch {batch}/GPU: {'OOM' if r.get('oom') else 'FAILED'} "
                          f"({r['error']})", flush=True)
                else:
                    mem = (f"peak {r['peak_alloc_gib']} GiB alloc / {r['peak_reserved_gib']} GiB reserved per GPU"
                           if cuda else f"peak RSS {r['peak_rss_gib']} GiB")
                    print(f"{preset} {mode} x{nproc} batch {batch}/GPU: {r['img_per_s']:.1f} img/s "
                          f"({r['ms_per_step']:.1f} ms/step), {mem}, loss {r['loss']} [{r['wall_s']} s]", flush=True)
                    for f in r.get("retried_after", []):
                        print(f"  (run again after a failed first launch: {f})", flush=True)
    efficiency(results)
    text = table(results, cuda)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"gpus": n, "env": NO_MULTICAST, "results": results, "table": text},
                                           indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
