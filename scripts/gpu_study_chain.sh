#!/usr/bin/env bash
# The three phases of scripts/gpu_fmnist_study.sh back to back on one GPU, as a background job that outlives
# the device call which starts it (start it with setsid). Used when the study shares a 2-GPU machine with
# other work (scripts/gpu_x2_session.sh): prep and train start at once; eval waits for $W/inc.ready, i.e.
# until a later call has brought the second part of the Inception weights.
set -u
export CUDA_VISIBLE_DEVICES=${STUDY_GPU:-0} OUT=${OUT:-/tmp/study_out} W=${W:-/tmp/study}
PHASE=prep bash scripts/gpu_fmnist_study.sh || echo "prep failed: $?"
PHASE=train bash scripts/gpu_fmnist_study.sh || echo "train failed: $?"
touch "$W/TRAINED"
until [ -f "$W/inc.ready" ]; do sleep 5; done
PHASE=eval bash scripts/gpu_fmnist_study.sh || echo "eval failed: $?"
touch "$W/DONE"
