#!/usr/bin/env bash
# The strided attention layouts (2026-12-02, second session) against the code before them, on one H200, in one call:
# the GPU attention tests, then compiled hmar-d16 training (batch 32) and compiled hmar-d30 sampling with the new
# kernel file and with the old one (in a copy of the tree). Before the call put the old file in the repo root:
#   git show 1c9fb29:hmar/attention/triton_kernel.py > old_triton_kernel.py   (untracked files travel; remove after)
# Results: $OUT/lay (BENCHMARKS.md sections 1b and 2e). About 7.5 minutes.
set -u; export PYTHONUNBUFFERED=1; L=$OUT/lay; mkdir -p $L
cp -r . /tmp/old && cp old_triton_kernel.py /tmp/old/hmar/attention/triton_kernel.py
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_attention.py > $L/tests.log 2>&1; echo "tests $?"; tail -2 $L/tests.log
for t in new old; do d=.; [ $t = old ] && d=/tmp/old
  (cd $d && timeout 140 python3 benchmarks/bench_train.py --preset hmar-d16 --batch 32 --compile --json $L/train-$t.json) > $L/train-$t.log 2>&1; echo "train $t $?"; grep img/s $L/train-$t.log
done
for t in new old; do d=.; [ $t = old ] && d=/tmp/old
  (cd $d && timeout 80 python3 benchmarks/bench_sample.py --reps 3 --configs hmar-d30 --variants fast-compiled --json $L/s-$t.json) > $L/s-$t.log 2>&1; echo "sample $t $?"; grep -E "^  hmar" $L/s-$t.log | head -1
done
