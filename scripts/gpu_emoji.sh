#!/usr/bin/env bash
# Train the shipped default model (tokenizer + HMAR stage 1 + stage 2) on the 64 px emoji set, on one GPU,
# within one ~6-minute budget, then measure training and sampling throughput. Reproduce with:
#   hmar data emoji --source NPM_TARBALLS --out .carry/emoji64 --size 64 --drop-skin-tones
#   OUT=out bash scripts/gpu_emoji.sh
# Every step has a wall-time budget (--time-budget), so the total is fixed whatever the GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1 HMAR_TRITON_AUTOTUNE=${HMAR_TRITON_AUTOTUNE:-0}
DATA=${DATA:-.carry/emoji64}
R=${RUNS:-/tmp/runs}
OUT=${OUT:-out}
TOK_S=${TOK_S:-110}; S1_S=${S1_S:-110}; S2_S=${S2_S:-45}
mkdir -p "$R" "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
W=$(( $(nproc) > 12 ? 12 : $(nproc) ))

echo "== 1. tokenizer ($TOK_S s)"
python3 -m hmar train-tokenizer --data "$DATA" --preset vqvae-64 --out "$R/tok" --batch-size 128 --workers "$W" \
  --lr 4e-4 --warmup-steps 200 --epochs 1000 --time-budget "$TOK_S" --log-every 250 --eval-batches 10 --ckpt-every 5000 \
  --no-progress --no-tensorboard
echo "== 2. token cache"
python3 -m hmar tokenize --data "$DATA" --tokenizer "$R/tok" --out "$R/cache.safetensors" --views 8 --batch-size 512 --no-progress
echo "== 3. stage 1 ($S1_S s)"
python3 -m hmar train --stage next-scale --model hmar-64 --tokenizer "$R/tok" --data "$R/cache.safetensors" \
  --out "$R/s1" --batch-size 256 --lr 1e-3 --warmup-steps 300 --epochs 100000 --time-budget "$S1_S" \
  --log-every 250 --sample-every -1 --eval-every 2000 --eval-batches 10 --ckpt-every 5000 --workers 2 --no-progress --no-tensorboard
echo "== 4. stage 2 ($S2_S s)"
python3 -m hmar train --stage masked --init "$R/s1" --data "$R/cache.safetensors" --out "$R/s2" \
  --batch-size 256 --lr 5e-4 --warmup-steps 100 --epochs 100000 --time-budget "$S2_S" \
  --log-every 250 --sample-every -1 --eval-every 2000 --eval-batches 10 --ckpt-every 5000 --workers 2 --no-progress --no-tensorboard
echo "== 5. export"
M="$R/s2/model"; [ -f "$M/config.json" ] || M="$R/s1/model"
python3 - "$M" "$OUT/default" <<'PY'
import sys, torch
from hmar import HMARPipeline
p = HMARPipeline.from_pretrained(sys.argv[1])
p.save_pretrained(sys.argv[2], dtype=torch.float16)
print("exported", sys.argv[1], "->", sys.argv[2], p.model.config.kind, p.class_names)
PY
python3 -m hmar sample --checkpoint "$OUT/default" --num-per-class 8 --cfg 2 --out "$OUT/grid.png" --no-progress --device "${DEV:-cuda}"
[ -n "${SKIP_BENCH:-}" ] && exit 0
echo "== 6. training throughput (bench_train)"
timeout 80 python3 benchmarks/bench_train.py --json "$OUT/train_bench.json" || echo "bench_train failed/timed out"
echo "== 7. sampling throughput (bench_sample)"
timeout 100 python3 benchmarks/bench_sample.py --configs hmar-d16,var-d16 --variants fp32-eager,fast --quick \
  --compile-mode default --json "$OUT/sample_bench.json" || echo "bench_sample failed/timed out"
date -u
