#!/usr/bin/env bash
# This session's GPU work on one H200 (2026-11-29), as three chained calls on one warm machine (the study's
# state lives in /tmp/study between them; send each call within the 30 s the machine stays warm):
#   call 1 (carry .carry/fmnist .carry/inc1): study PHASE=prep, then the sampling benchmark
#   call 2 (carry .carry/inc2):               study PHASE=train, then eager training figures and the GPU tests
#   call 3:                                   study PHASE=eval, then compiled training figures
# The fp16 Inception (43.6 MB) travels in two pieces, 6,500,000 bytes with the data and the rest in call 2
# (a call carries at most 64 MiB beside the ~29 MB tree). Logs come back as $OUT/callN.tgz.
set -u
CALL=${1:?usage: gpu_h200_session.sh 1|2|3}
export PYTHONUNBUFFERED=1
W=/tmp/study L=/tmp/logs/call$CALL T0=$SECONDS
mkdir -p "$L" "$W" "${OUT:=/tmp/out}"
pack() { tar czf "$OUT/call$CALL.tgz" -C /tmp/logs "call$CALL"; for f in table.md tokenizer.json results.tgz; do
  [ -f "$L/study/$f" ] && cp "$L/study/$f" "$OUT/"; done; }
trap pack EXIT
step() { echo "== $(date -u +%T) $*"; }
left() { echo $(( ${1:-570} - (SECONDS - T0) )); }   # seconds left of this call's budget
study() { step "study $1"; PHASE=$1 OUT="$L/study" timeout "$2" bash scripts/gpu_fmnist_study.sh > /dev/null 2>&1
  echo "study $1: exit $?"; tail -4 "$L/study/log_$1.txt"; }
B=benchmarks/bench_train.py
case $CALL in
1)
  { nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L/machine.txt" 2>&1
  cp .carry/inc1/part.aa "$W/inc.part.aa"
  study prep 420   # measured: 5.3 min (the 300 s first used here stopped it during the token cache)
  step sampling; timeout "$(left)" python3 benchmarks/bench_sample.py --reps 3 --variants fp32-eager,fast \
    --configs hmar-d16,var-d16,hmar-d16-512,hmar-d30,var-d30,var-d16-512,hmar-d30-512,var-d30-512 \
    --json "$L/sample.json" > "$L/sample.log" 2>&1; grep -v Warn "$L/sample.log" ;;
2)
  cp .carry/inc2/part.ab "$W/inc.part.ab"
  cat "$W/inc.part.aa" "$W/inc.part.ab" | sha256sum | grep -q 62eeac4164883cbc89891a1358b5fc7dff36d5f1e6a3c03ebf2a70f6d67a8f07 \
    && cat "$W/inc.part.aa" "$W/inc.part.ab" > "$W/inc16.safetensors" || echo "Inception pieces do not match the checksum"
  study train 400
  step eager training
  timeout 60 python3 $B --preset hmar-d16 var-d16 --attention-backend auto per_scale --json "$L/train-eager.json" > "$L/train-eager.log" 2>&1
  timeout 40 python3 $B --preset hmar-d16 var-d16 --no-chunked-ce --json "$L/train-eager-plain.json" > "$L/train-eager-plain.log" 2>&1
  timeout 30 python3 $B --preset hmar-d16 --stage masked --json "$L/train-eager-masked.json" > "$L/train-eager-masked.log" 2>&1
  grep -h 'img/s\|memory\|Error' "$L"/train-eager*.log
  step tests; timeout "$(left)" python3 -m pytest -q -p no:cacheprovider tests/test_accel.py tests/test_training_fast.py \
    tests/test_triton_attention.py > "$L/gpu-tests.log" 2>&1; tail -3 "$L/gpu-tests.log" ;;
3)
  study eval 420   # measured: 5.7 min
  step compiled training; timeout "$(left)" python3 $B --preset hmar-d16 hmar-d30 hmar-d16-512 var-d16 --compile \
    --json "$L/train-compiled.json" > "$L/train-compiled.log" 2>&1
  grep -h 'img/s\|memory\|Error' "$L/train-compiled.log" ;;
esac
