#!/usr/bin/env bash
# The GPU work of one session on nvidia-h200-x2, as three chained calls on one warm machine (2026-11-29):
#   call 1 (carry .carry/fmnist .carry/inc1): start the Fashion-MNIST study on GPU 0 in the background
#          (scripts/gpu_study_chain.sh); on GPU 1: the GPU tests, the sampling benchmark, eager training figures
#   call 2 (carry .carry/inc2): complete the Inception weights (the study's eval phase starts); on GPU 1: the
#          compiled training figures
#   call 3: both GPUs: the NCCL world-size tests, every training stage with DDP/FSDP, torchrun generation,
#          then (once the study is done) the scaling benchmarks
# Every figure of a speed benchmark comes from a GPU that nothing else uses at that moment (the study runs on
# the other one). The Inception (fp16, 43.6 MB) travels in two pieces: 6,500,000 bytes with the data, the rest
# in call 2 (a call carries at most 64 MiB with the ~29 MB tree). Logs: $OUT/callN.tgz.
set -u
CALL=${1:?usage: gpu_x2_session.sh 1|2|3}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$PWD W=/tmp/study SO=/tmp/study_out L=/tmp/logs/call$CALL
mkdir -p "$L" "$W" "$SO" "${OUT:=/tmp/out}"
pack() {
  cp "$SO"/* "$L"/ 2>/dev/null
  tar czf "$OUT/call$CALL.tgz" -C /tmp/logs "call$CALL"
  for f in table.md tokenizer.json results.tgz; do [ -f "$SO/$f" ] && cp "$SO/$f" "$OUT/"; done
  echo "== study: $(ls $W | tr '\n' ' ')"; tail -5 "$SO"/chain.log 2>/dev/null
}
trap pack EXIT
step() { echo "== $(date -u +%T) $*"; }
case $CALL in
1)
  { nvidia-smi; nvidia-smi topo -m; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L/machine.txt" 2>&1
  rm -rf /tmp/repo && cp -r "$R" /tmp/repo && cp .carry/inc1/part.aa "$W/inc.part.aa"
  (cd /tmp/repo && setsid nohup bash scripts/gpu_study_chain.sh > "$SO/chain.log" 2>&1 < /dev/null &)
  export CUDA_VISIBLE_DEVICES=1
  step tests; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_accel.py tests/test_training_fast.py \
    tests/test_triton_attention.py > "$L/gpu-tests.log" 2>&1; tail -3 "$L/gpu-tests.log"
  step sampling; timeout 320 python3 benchmarks/bench_sample.py --reps 3 --variants fp32-eager,fast \
    --configs hmar-d16,var-d16,hmar-d16-512,hmar-d30,var-d30,var-d16-512,hmar-d30-512,var-d30-512 \
    --json "$L/sample.json" > "$L/sample.log" 2>&1; cat "$L/sample.log"
  step eager training; B=benchmarks/bench_train.py
  timeout 60 python3 $B --preset hmar-d16 var-d16 --attention-backend auto per_scale --json "$L/train-eager.json" > "$L/train-eager.log" 2>&1
  timeout 40 python3 $B --preset hmar-d16 var-d16 --no-chunked-ce --json "$L/train-eager-plain.json" > "$L/train-eager-plain.log" 2>&1
  timeout 30 python3 $B --preset hmar-d16 --stage masked --json "$L/train-eager-masked.json" > "$L/train-eager-masked.log" 2>&1
  cat "$L"/train-eager*.log | grep -v Warning ;;
2)
  cp .carry/inc2/part.ab "$W/inc.part.ab"
  if cat "$W/inc.part.aa" "$W/inc.part.ab" | sha256sum | grep -q 62eeac4164883cbc89891a1358b5fc7dff36d5f1e6a3c03ebf2a70f6d67a8f07
  then touch "$W/inc.ready"; else echo "Inception pieces do not match the checksum"; fi
  export CUDA_VISIBLE_DEVICES=1; B=benchmarks/bench_train.py
  step compiled training; timeout 380 python3 $B --preset hmar-d16 var-d16 hmar-d30 hmar-d16-512 --compile \
    --json "$L/train-compiled.json" > "$L/train-compiled.log" 2>&1
  timeout 130 python3 $B --preset hmar-d16 --stage masked --compile --json "$L/train-compiled-masked.json" \
    > "$L/train-compiled-masked.log" 2>&1
  grep -h 'img/s\|memory\|Error' "$L"/train-compiled*.log ;;
3)
  export CUDA_VISIBLE_DEVICES=0,1
  step world-size tests and stages
  HMAR_WORLD_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_training_world_size.py \
    > "$L/world-size-tests.log" 2>&1 &
  for i in $(seq 24); do [ -f "$W/DONE" ] && break; sleep 5; done
  timeout 240 bash scripts/gpu_multi_stages.sh > "$L/stages.log" 2>&1
  wait; tail -3 "$L/world-size-tests.log"; cat "$L/stages.log"; cp /tmp/multi/*.log "$L/" 2>/dev/null
  for i in $(seq 60); do [ -f "$W/DONE" ] && break; sleep 5; done
  step scaling; S=benchmarks/bench_scaling.py
  timeout 170 python3 $S --preset hmar-d16 --batch 32 --json "$L/scaling-d16.json" > "$L/scaling-d16.log" 2>&1
  timeout 230 python3 $S --preset hmar-d30 --batch 16 --json "$L/scaling-d30.json" > "$L/scaling-d30.log" 2>&1
  cat "$L"/scaling-*.log | tail -40 ;;
esac
