#!/usr/bin/env bash
# The multi-GPU issue in one device call on nvidia-h200-x2 (5.8 min measured 2026-11-29): NCCL world-size tests (checkpoints
# 2 -> 1 and 1 -> 2 GPUs, DDP and FSDP2, same loss curve), every training stage with DDP and FSDP2
# (scripts/gpu_multi_stages.sh), torchrun generation against 1 process, then the scaling benchmarks.
#   device run: LIMIT=480 OUT=$OUT bash scripts/gpu_x2_multi.sh   (kind nvidia-h200-x2; nothing to carry; LIMIT:
#   seconds after which the scaling runs are cut, default 560)
# NVLink multicast stays off (the three variables below; bench_scaling.py passes them to its children too).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
L=/tmp/x2logs T0=$SECONDS; mkdir -p "$L" "${OUT:=/tmp/out}"
left() { local s=$(( ${LIMIT:-560} - (SECONDS - T0) )); echo $(( s > 1 ? s : 1 )); }  # ends inside one 600 s call
trap 'tar czf "$OUT/x2.tgz" -C /tmp x2logs' EXIT
{ nvidia-smi; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"; } > "$L/machine.txt" 2>&1
echo "== $(date -u +%T) world-size tests (NCCL) and every stage on 2 GPUs, side by side"
HMAR_WORLD_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_training_world_size.py \
  > "$L/world-size-tests.log" 2>&1 &
timeout 240 bash scripts/gpu_multi_stages.sh > "$L/stages.log" 2>&1
wait
tail -3 "$L/world-size-tests.log"; cat "$L/stages.log"; cp /tmp/multi/*.log "$L/" 2>/dev/null
echo "== $(date -u +%T) scaling"
S=benchmarks/bench_scaling.py
timeout "$(( $(left) < 150 ? $(left) : 150 ))" python3 $S --preset hmar-d16 --batch 32 --json "$L/scaling-d16.json" \
  > "$L/scaling-d16.log" 2>&1
timeout "$(left)" python3 $S --preset hmar-d30 --batch 16 --json "$L/scaling-d30.json" > "$L/scaling-d30.log" 2>&1
tail -n 15 "$L"/scaling-*.log
