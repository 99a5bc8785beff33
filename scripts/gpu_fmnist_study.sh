#!/usr/bin/env bash
# Fashion-MNIST quality study: HMAR vs VAR at equal GPU time, sampling-time ablations, FID / precision /
# recall / class accuracy against the 10k test images, the real-data floor and the tokenizer's numbers.
#
# Three phases, each one `device run` of under 10 minutes, CHAINED ON ONE WARM MACHINE (state lives in
# $W=/tmp/study between calls; send the next call within the 30 s the machine stays warm). Why three:
# a call carries at most 64 MiB, the tracked tree is ~29 MB, Fashion-MNIST is 31 MB and the fp16 FID
# Inception is 44 MB, so the Inception travels in two halves with the later phases.
#
# Here, once:  mkdir -p .carry/fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .carry/fmnist/
#              hmar export-inception --out /tmp/inc16.safetensors
#              mkdir -p .carry/inc && split -n 2 /tmp/inc16.safetensors .carry/inc/part.   # part.aa, part.ab
# GPU calls:   PHASE=prep  bash scripts/gpu_fmnist_study.sh        (carry .carry/fmnist)
#              PHASE=train bash scripts/gpu_fmnist_study.sh        (carry .carry/inc/part.aa)
#              PHASE=eval  bash scripts/gpu_fmnist_study.sh        (carry .carry/inc/part.ab)
#              PHASE=recon bash scripts/gpu_fmnist_study.sh        (the tokenizer's numbers alone, after prep,
#                                                               once both Inception pieces are there: ~1 min)
# Measured on one H200 (2026-11-29): prep 5.3 min, train 5.5 min, eval 5.7 min.
# CPU dry run: PHASE=all DEV=cpu DATA_LIMIT=10 PER_CLASS=3 TOK_S=15 T=30 T2=10 BS=32 WORKERS=0 runs every phase small.
set -uo pipefail
export PYTHONUNBUFFERED=1
PHASE=${PHASE:?set PHASE to prep, train, eval, recon or all}
W=${W:-/tmp/study}
OUT=${OUT:-out}
DEV=${DEV:-cuda}
DATA_LIMIT=${DATA_LIMIT:-}             # images per class and split (dry runs only; unset for the study)
PER_CLASS=${PER_CLASS:-1000}           # samples per class (10 classes: 10k)
TOK_S=${TOK_S:-120}                    # tokenizer budget (s)
T=${T:-150}                            # GPU-time budget of each generator (HMAR: stage 1 + stage 2 = T)
T2=${T2:-50}                           # of which stage 2
BS=${BS:-256}
WORKERS=${WORKERS:-8}
mkdir -p "$W" "$OUT"
# every call keeps the Inception pieces it carried (.carry/inc/part.* or .carry/inc*/part.*): a later call may not
for f in .carry/inc/part.* .carry/inc*/part.*; do [ -f "$f" ] && cp "$f" "$W/inc.$(basename "$f")"; done
exec > >(tee -a "$OUT/log_$PHASE.txt") 2>&1
date -u
[ -n "$DATA_LIMIT" ] && echo "WARNING: DATA_LIMIT=$DATA_LIMIT images per class and split: a dry run, not the study"
H="python3 -m hmar"
common_train=(--batch-size "$BS" --workers 2 --log-every 250 --sample-every -1 --eval-every 100000 --eval-batches 20
              --ckpt-every 100000 --no-progress --no-tensorboard)

prep() {
  echo "== data"
  $H data fashion-mnist --source .carry/fmnist --out "$W/fmnist" ${DATA_LIMIT:+--limit-per-class $DATA_LIMIT}
  echo "== classifier"
  $H train-classifier --data "$W/fmnist" --out "$W/clf.safetensors" --epochs 3 --device "$DEV"
  echo "== tokenizer ($TOK_S s)"
  $H train-tokenizer --data "$W/fmnist" --preset vqvae-32 --out "$W/tok" --batch-size 256 --workers "$WORKERS" \
    --lr 4e-4 --warmup-steps 200 --epochs 100000 --time-budget "$TOK_S" --log-every 200 --eval-batches 10 \
    --ckpt-every 100000 --no-progress --no-tensorboard --device "$DEV"
  echo "== token cache"
  $H tokenize --data "$W/fmnist" --tokenizer "$W/tok" --out "$W/cache.safetensors" --views 4 --batch-size 1000 \
    --no-progress --device "$DEV"
  cp "$W/tok/tokenizer/config.json" "$OUT/tokenizer_config.json" 2>/dev/null || true
  # the weights come back too (12 MB), so the tokenizer's figures (PHASE=recon, study_support.py recon + hmar
  # eval) can also be computed off the GPU machine if its time runs out first
  cp "$W/tok/tokenizer/"*.safetensors "$OUT/" 2>/dev/null || true
}

train() {
  echo "== HMAR stage 1 ($((T - T2)) s) + stage 2 ($T2 s)"
  $H train --stage next-scale --model hmar-32 --tokenizer "$W/tok" --data "$W/cache.safetensors" --out "$W/hmar_s1" \
    --lr 1e-3 --warmup-steps 300 --epochs 100000 --time-budget $((T - T2)) --device "$DEV" "${common_train[@]}"
  $H train --stage masked --init "$W/hmar_s1" --data "$W/cache.safetensors" --out "$W/hmar" \
    --lr 5e-4 --warmup-steps 100 --epochs 100000 --time-budget "$T2" --device "$DEV" "${common_train[@]}"
  echo "== VAR ($T s, same width and depth)"
  $H train --stage next-scale --model var-32 --tokenizer "$W/tok" --data "$W/cache.safetensors" --out "$W/var" \
    --lr 1e-3 --warmup-steps 300 --epochs 100000 --time-budget "$T" --device "$DEV" "${common_train[@]}"
  grep -h "done:" "$W"/hmar_s1/log.txt "$W"/hmar/log.txt "$W"/var/log.txt 2>/dev/null || true
}

gen() {  # gen NAME MODEL [sampling flags]
  local name=$1 model=$2; shift 2
  $H generate -c "$model" --per-class "$PER_CLASS" --batch-size 500 --out "$W/samples/$name" --device "$DEV" "$@"
}

score() {  # score NAME FOLDER
  mkdir -p "$W/results/$1"
  $H eval --samples "$2" --reference "$W/fmnist/test" --classifier "$W/clf.safetensors" \
    --inception "$W/inc16.safetensors" --batch-size 500 --device "$DEV" --out "$W/results/$1/metrics.json"
}

inception() {  # the fp16 Inception from the pieces the calls carried (copied to $W above)
  [ -f "$W/inc16.safetensors" ] || cat "$W"/inc.part.* > "$W/inc16.safetensors"
}

recon() {  # the tokenizer's numbers alone: test-set reconstructions, PSNR, codebook usage, reconstruction FID
  inception
  python3 scripts/study_support.py recon "$W/tok" "$W/fmnist/test" "$W/samples/tokenizer_recon" | tee "$OUT/tokenizer.json"
  score tokenizer_recon "$W/samples/tokenizer_recon"
  cp "$W/results/tokenizer_recon/metrics.json" "$OUT/tokenizer_recon_metrics.json"
}

evaluate() {
  inception
  echo "== samples"
  gen hmar_default "$W/hmar/model"
  gen hmar_sched_none "$W/hmar/model" --schedule none
  gen hmar_sched_coarse "$W/hmar/model" --schedule coarse
  gen hmar_guide_masked "$W/hmar/model" --guide-masked
  for c in 0 0.5 3; do gen "hmar_cfg$c" "$W/hmar/model" --cfg "$c"; done
  gen var_default "$W/var/model"
  for c in 0 3; do gen "var_cfg$c" "$W/var/model" --cfg "$c"; done
  echo "== floor and tokenizer"
  python3 scripts/study_support.py subset "$W/fmnist/train" $((PER_CLASS * 10)) "$W/samples/real_train_floor"
  [ -d "$W/samples/tokenizer_recon" ] ||   # done already by PHASE=recon
    python3 scripts/study_support.py recon "$W/tok" "$W/fmnist/test" "$W/samples/tokenizer_recon" | tee "$OUT/tokenizer.json"
  echo "== scores"
  for d in "$W"/samples/*/; do score "$(basename "$d")" "$d"; done
  python3 scripts/study_support.py table "$W/results" | tee "$OUT/table.md"
  tar czf "$OUT/results.tgz" -C "$W" results
}

case "$PHASE" in
  prep) prep ;;
  train) train ;;
  eval) evaluate ;;
  recon) recon ;;
  all) prep && train && evaluate ;;
  *) echo "unknown PHASE $PHASE"; exit 2 ;;
esac
date -u
