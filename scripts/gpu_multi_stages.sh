#!/usr/bin/env bash
# Every training job on 2 GPUs with DDP and with FSDP2: HMAR stage 1, stage 2 (from the stage-1 result) and the
# VAR baseline, plus `hmar generate` under torchrun compared file by file with a 1-process run of the same command.
# Data: the Fashion-MNIST token cache of the study when $W/cache.safetensors exists (hmar-32 / var-32), else a
# synthetic shapes set with a random tokenizer (hmar-tiny / var-tiny), so it runs on a bare machine.
# Jobs of one kind run concurrently (they only have to work and learn, not to be timed).
# CPU smoke run: M=/tmp/m STEPS=4 BS=16 DEV=cpu PER_CLASS=2 bash scripts/gpu_multi_stages.sh
set -u
W=${W:-/tmp/study}; M=${M:-/tmp/multi}; mkdir -p "$M"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -f "$W/cache.safetensors" ]; then
  CACHE=$W/cache.safetensors TOK=$W/tok HM=hmar-32 VM=var-32
else
  CACHE=$M/shapes.safetensors TOK=$M/tok HM=hmar-tiny VM=var-tiny
  [ -f "$CACHE" ] || $PY - "$M" <<'PYEOF'
import sys
from pathlib import Path
from hmar.training.synthetic import make_random_tokenizer, make_shapes_folder
from hmar.training.tokenize import tokenize_folder
m = Path(sys.argv[1])
make_shapes_folder(m / "shapes", 3, 400, 64, val_per_class=20)
tok = make_random_tokenizer(m / "tok")
tokenize_folder(m / "shapes", tok, m / "shapes.safetensors", views=1, progress=False, say=print)
PYEOF
fi
echo "data: $CACHE, models $HM / $VM"
TR="$PY -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1"
STEPS=${STEPS:-150} BS=${BS:-256}   # smaller for a CPU smoke run
common=(--data "$CACHE" --batch-size "$BS" --max-steps "$STEPS" --log-every 25 --sample-every -1
        --eval-every "$STEPS" --eval-batches 5 --ckpt-every "$STEPS" --no-progress --no-tensorboard --workers 2 --lr 5e-4)
run() {  # run NAME PORT [train flags]
  local name=$1 port=$2; shift 2
  $TR --master_port "$port" -m hmar train --out "$M/$name" "${common[@]}" "$@" > "$M/$name.log" 2>&1
  echo "$name: exit $? | $(grep -h 'done:' "$M/$name/log.txt" 2>/dev/null) | $(grep -h 'process(es)' "$M/$name/log.txt" | head -1)"
  grep -h '"kind": "train"' "$M/$name/metrics.jsonl" 2>/dev/null | sed -n '1p;$p'
}
run s1-ddp 29510 --stage next-scale --model "$HM" --tokenizer "$TOK" &
run s1-fsdp 29511 --stage next-scale --model "$HM" --tokenizer "$TOK" --fsdp &
run var-ddp 29512 --stage next-scale --model "$VM" --tokenizer "$TOK" &
run var-fsdp 29513 --stage next-scale --model "$VM" --tokenizer "$TOK" --fsdp &
wait
run s2-ddp 29514 --stage masked --init "$M/s1-ddp" &
run s2-fsdp 29515 --stage masked --init "$M/s1-fsdp" --fsdp &
wait
G=(-m hmar generate -c "$M/s2-ddp/model" --per-class "${PER_CLASS:-100}" --batch-size 50 --device "${DEV:-cuda}")
OMP_NUM_THREADS=1 $PY "${G[@]}" --out "$M/gen1" > "$M/gen1.log" 2>&1; echo "generate, 1 process: exit $?"
OMP_NUM_THREADS=1 $TR --master_port 29516 "${G[@]}" --out "$M/gen2" > "$M/gen2.log" 2>&1
echo "generate, torchrun 2 processes: exit $?, $(find "$M/gen2" -name '*.png' | wc -l) files"
a=$(cd "$M/gen1" && find . -name '*.png' | sort | xargs sha256sum | sha256sum)
b=$(cd "$M/gen2" && find . -name '*.png' | sort | xargs sha256sum | sha256sum)
echo "2-process files vs 1-process files: $([ "$a" = "$b" ] && echo byte-identical || echo DIFFERENT)"
