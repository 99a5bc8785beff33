#!/usr/bin/env bash
# What is left of the GPU work after 2026-11-29, in two chained calls on one warm machine (state in /tmp/study;
# send call 2 within the 30 s the machine stays warm), then scripts/gpu_x2_multi.sh on nvidia-h200-x2:
#   call 1 (carry .carry/fmnist .carry/inc1): study PHASE=prep + the sampling benchmark (all configs)
#   call 2 (carry .carry/inc2):               study PHASE=recon (tokenizer rFID) + compiled training figures
# With 2 GPUs visible the two jobs of a call run side by side (study on GPU 0, the timed benchmark alone on
# GPU 1); with one GPU they run one after the other. .carry/inc1 / inc2: the fp16 Inception split at 6,500,000
# bytes (`head -c 6500000 inc16.safetensors > .carry/inc1/part.aa; tail -c +6500001 ... > .carry/inc2/part.ab`).
# Ran 2026-11-29 on nvidia-h200-x2: call 1 in 6.3 min, call 2 in 5.4 min (its compiled training reached hmar-d16
# only). What those calls left, on one H200 (nothing to carry, ~6 min):
#   call 3: compiled training of hmar-d30 / hmar-d16-512 / var-d16 (the decoder variants and sampling on an idle
#           host moved to scripts/gpu_fast_sampling.sh, which measures the fast path of 2026-12-01 against the old)
#           (ran 2026-12-02 with LIMIT=320: hmar-d30 and hmar-d16-512 only, BENCHMARKS.md section 2d)
#   call 4: what call 3 left: compiled var-d16 and the profile of the compiled hmar-d16 step (~5 min)
#           (ran in the second session of 2026-12-02, BENCHMARKS.md section 2e)
#   call 5 (written then for the next session): compiled hmar-d30 at batch 16 with the strided attention layouts
#           (its compile did not fit in that session's call) and the compiled masked stage (stage 2) of hmar-d16,
#           never measured compiled (~7 min)
set -u
CALL=${1:?usage: gpu_remaining.sh 1|2|3|4|5}
export PYTHONUNBUFFERED=1
L=/tmp/logs/rem$CALL T0=$SECONDS
mkdir -p "$L" "${OUT:=/tmp/out}"
trap 'tar czf "$OUT/rem$CALL.tgz" -C /tmp/logs "rem$CALL"' EXIT
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
LIMIT=${LIMIT:-$([ "$CALL" = 2 ] && echo 320 || echo 570)}   # call 2 is kept short: the x2 call follows on the same lease
left() { local s=$(( LIMIT - (SECONDS - T0) )); echo $(( s > 1 ? s : 1 )); }   # timeout 0 would mean none
study() { CUDA_VISIBLE_DEVICES=0 PHASE=$1 OUT="$L/study" timeout "$2" bash scripts/gpu_fmnist_study.sh > /dev/null 2>&1
  echo "study $1: exit $?"; tail -3 "$L/study/log_$1.txt"; }
bench_gpu() { [ "$NG" -ge 2 ] && echo 1 || echo 0; }
B=benchmarks/bench_train.py
compiled_goals() {  # the other goal configs compiled, each at its goal batch (appends to train-compiled.log)
  timeout "$(left)" python3 $B --preset hmar-d30 --batch 16 --compile --json "$L/train-d30.json" >> "$L/train-compiled.log" 2>&1
  timeout "$(left)" python3 $B --preset hmar-d16-512 --batch 8 --compile --json "$L/train-d16-512.json" >> "$L/train-compiled.log" 2>&1
  timeout "$(left)" python3 $B --preset var-d16 --compile --json "$L/train-var-d16.json" >> "$L/train-compiled.log" 2>&1
}
d16_profile() {  # where the compiled hmar-d16 step's 87 ms go (floor 38 ms): the kernels of 3 steps (never profiled)
  timeout "$(left)" python3 $B --preset hmar-d16 --compile --profile --steps 10 --warmup 3 \
    --json "$L/train-d16-profile.json" > "$L/train-d16-profile.log" 2>&1
}
case $CALL in
1)
  nvidia-smi > "$L/machine.txt" 2>&1
  if [ "$NG" -ge 2 ]; then study prep 420 & else study prep 420; fi
  CUDA_VISIBLE_DEVICES=$(bench_gpu) timeout "$(left)" python3 benchmarks/bench_sample.py --reps 3 \
    --variants fp32-eager,fast --configs hmar-d16,var-d16,hmar-d30,hmar-d16-512,hmar-d30-512,var-d30,var-d16-512,var-d30-512 \
    --json "$L/sample.json" > "$L/sample.log" 2>&1
  grep -E '^  (hmar|var)|ratio|x$' "$L/sample.log"; wait ;;
2)
  if [ "$NG" -ge 2 ]; then study recon 150 & else study recon 150; fi
  # eager and compiled side by side for hmar-d16; then the other goal configs compiled, each at its goal batch
  export CUDA_VISIBLE_DEVICES=$(bench_gpu)
  timeout "$(left)" python3 $B --preset hmar-d16 --compare-compile --json "$L/train-d16.json" > "$L/train-compiled.log" 2>&1
  compiled_goals
  unset CUDA_VISIBLE_DEVICES
  grep -h 'img/s\|memory' "$L/train-compiled.log"; wait
  cp "$L/study/tokenizer.json" "$L/study/tokenizer_recon_metrics.json" "$OUT/" 2>/dev/null ;;
3)
  nvidia-smi > "$L/machine.txt" 2>&1
  compiled_goals
  d16_profile
  grep -h 'img/s' "$L/train-compiled.log" "$L/train-d16-profile.log" ;;
4)
  nvidia-smi > "$L/machine.txt" 2>&1
  timeout "$(left)" python3 $B --preset var-d16 --compile --json "$L/train-var-d16.json" > "$L/train-compiled.log" 2>&1
  d16_profile
  grep -h 'img/s' "$L/train-compiled.log" "$L/train-d16-profile.log" ;;
5)
  nvidia-smi > "$L/machine.txt" 2>&1
  timeout "$(( $(left) < 330 ? $(left) : 330 ))" python3 $B --preset hmar-d30 --batch 16 --compile --steps 15 \
    --warmup 4 --json "$L/train-d30.json" > "$L/train-compiled.log" 2>&1
  timeout "$(left)" python3 $B --preset hmar-d16 --stage masked --batch 32 --compile --json "$L/train-d16-masked.json" \
    >> "$L/train-compiled.log" 2>&1
  grep -h 'img/s' "$L/train-compiled.log" ;;
esac
