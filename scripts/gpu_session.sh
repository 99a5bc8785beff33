#!/usr/bin/env bash
# One device call of a GPU session (2026-12-01, 2026-12-02): a phase of the Fashion-MNIST study (#5), then, in the time left
# of the call, steps of the sampling benchmark of the fast path (#6; scripts/gpu_fast_sampling.sh). Three calls
# CHAINED ON ONE WARM MACHINE (the study's state lives in /tmp/study; send the next call within 30 s):
#   call 1 (carry .carry/fmnist .carry/inc1): study prep  (~5.3 min), then the graphed-sampling tests, hmar-d16 in
#                                             every variant, the other GPU tests
#   call 2 (carry .carry/inc2):               study train (~5.5 min), then hmar-d30 and hmar-d30-512
#   call 3 (nothing to carry):                study eval  (~5.7 min), then hmar-d16-512, var-d16, decoders
# .carry/inc1 / .carry/inc2 are the fp16 Inception split at 6,500,000 bytes (scripts/gpu_fmnist_study.sh header).
# The bench steps get what is left of the call's CALL_S seconds (default 555); logs come back as
# $OUT/sessionN.tgz, the study's as $OUT/study_PHASE.tgz (and the tokenizer's weights as $OUT/study_*.safetensors).
set -u
CALL=${1:?usage: gpu_session.sh 1|2|3}
export PYTHONUNBUFFERED=1
CALL_S=${CALL_S:-555}
# the study reads no time limit; DATA_LIMIT (images per class, dry runs) must not leak into it
unset LIMIT DATA_LIMIT
T0=$SECONDS
mkdir -p "${OUT:=/tmp/out}" /tmp/logs/study
case $CALL in 1) PH=prep ;; 2) PH=train ;; 3) PH=eval ;; *) echo "usage: gpu_session.sh 1|2|3"; exit 2 ;; esac
echo "== $(date -u +%T) study $PH"
PHASE=$PH OUT=/tmp/logs/study bash scripts/gpu_fmnist_study.sh > /dev/null 2>&1; echo "study $PH: exit $?"
tail -4 "/tmp/logs/study/log_$PH.txt"
# the study's files: weights flat (the tokenizer's, 12 MB), everything else in one tgz (at most 8 files come back)
for f in /tmp/logs/study/*.safetensors; do [ -f "$f" ] && mv "$f" "$OUT/study_$(basename "$f")"; done
tar czf "$OUT/study_$PH.tgz" -C /tmp/logs study
LEFT=$(( CALL_S - (SECONDS - T0) ))
echo "== $(date -u +%T) bench, $LEFT s left"
case $CALL in
  1) STEPS="quick-tests d16 tests" ;;
  2) STEPS="d30" ;;
  3) STEPS="d16-512 var-d16 decoders" ;;
esac
OUT=$OUT LIMIT=$LEFT TAG=session$CALL bash scripts/gpu_fast_sampling.sh $STEPS
