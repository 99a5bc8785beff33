#!/usr/bin/env bash
# Every training job on 2 GPUs with DDP and with FSDP2: HMAR stage 1, stage 2 (from the stage-1 result) and the
# VAR baseline, on the Fashion-MNIST token cache of the study (scripts/gpu_fmnist_study.sh, PHASE=prep), plus
# `hmar generate` under torchrun compared file by file with a 1-GPU run of the same command.
# Jobs of one kind run concurrently (they only have to work, not to be timed).
set -u
W=${W:-/tmp/study}; M=${M:-/tmp/multi}; mkdir -p "$M"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
TR="python3 -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1"
STEPS=${STEPS:-150} BS=${BS:-256}   # smaller for a CPU smoke run
common=(--data "$W/cache.safetensors" --batch-size "$BS" --max-steps "$STEPS" --log-every 25 --sample-every -1
        --eval-every "$STEPS" --eval-batches 5 --ckpt-every "$STEPS" --no-progress --no-tensorboard --workers 2 --lr 5e-4)
run() {  # run NAME PORT [train flags]
  local name=$1 port=$2; shift 2
  $TR --master_port "$port" -m hmar train --out "$M/$name" "${common[@]}" "$@" > "$M/$name.log" 2>&1
  echo "$name: exit $? | $(grep -h 'done:' "$M/$name/log.txt" 2>/dev/null) | $(grep -h 'process(es)' "$M/$name/log.txt" | head -1)"
  grep -h '"kind": "train"' "$M/$name/metrics.jsonl" 2>/dev/null | sed -n '1p;$p'
}
run s1-ddp 29510 --stage next-scale --model hmar-32 --tokenizer "$W/tok" &
run s1-fsdp 29511 --stage next-scale --model hmar-32 --tokenizer "$W/tok" --fsdp &
run var-ddp 29512 --stage next-scale --model var-32 --tokenizer "$W/tok" &
run var-fsdp 29513 --stage next-scale --model var-32 --tokenizer "$W/tok" --fsdp &
wait
run s2-ddp 29514 --stage masked --init "$M/s1-ddp" &
run s2-fsdp 29515 --stage masked --init "$M/s1-fsdp" --fsdp &
wait
if [ -d "$W/hmar/model" ]; then
  $TR --master_port 29516 -m hmar generate -c "$W/hmar/model" --per-class "${PER_CLASS:-1000}" --batch-size 500 --out "$M/gen2" \
    --device "${DEV:-cuda}" > "$M/gen2.log" 2>&1
  echo "torchrun generate (2 GPUs): exit $?, $(find "$M/gen2" -name '*.png' | wc -l) files"
  if [ -f "$W/DONE" ]; then
    a=$(cd "$W/samples/hmar_default" && find . -name '*.png' | sort | xargs sha256sum | sha256sum)
    b=$(cd "$M/gen2" && find . -name '*.png' | sort | xargs sha256sum | sha256sum)
    echo "2-GPU files vs the 1-GPU eval run: $([ "$a" = "$b" ] && echo byte-identical || echo DIFFERENT)"
  fi
fi
