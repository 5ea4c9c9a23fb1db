#!/usr/bin/env bash
# Train every MNIST model of checkpoints/mnist, then export them (copy + reference stats + quality).
#
#   DNGJAX_DATA_DIR=../shared/data bash train/train_all_mnist.sh        # CPU sizes, two models at a time
#   SIZE=gpu bash train/train_all_mnist.sh                              # GPU sizes, one after another
#
# CPU size: two lanes run at once, each pinned to one core (taskset) with one XLA thread, because one
# process per core gives more images/s on the whole machine than one process on both cores
# (bench/train.py --only cores). Lane 0: ddpm, then forget models of FORGET_LANE0 (default "0 1");
# lane 1: cond, then FORGET_LANE1 (default "2 3"; an empty value skips them, e.g. on a fresh machine
# where the shipped forget models are final). Forget models train from scratch on their class
# (FORGET_FROM_SCRATCH=0 fine-tunes them from the ddpm instead; the GPU size does that by default, and
# runs the models one after another, so the ddpm is finished before its forget models start).
#
# Resumable: rerun the same command after an interruption (kill -9 included); finished models are
# skipped and unfinished ones continue from their last checkpoint in $WORKDIR, or, on a fresh machine,
# from the run saved in checkpoints/train_state/NAME (TRAIN_STATE=... elsewhere; see its README). Step counts:
# STEPS_DDPM, STEPS_COND, STEPS_FORGET, STEPS_CLASSIFIER (else the configs' defaults). A model that
# finished at fewer steps trains on when its STEPS_* is raised (delete WORKDIR/NAME/model first).
# The classifier is trained only with TRAIN_CLASSIFIER=1 (or SIZE=gpu): the shipped one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-cpu}
WORKDIR=${WORKDIR:-workdir/$SIZE}
OUT=${OUT:-checkpoints/mnist}
PY=${PYTHON:-python}
TRAIN_STATE=${TRAIN_STATE:-checkpoints/train_state}
if [ "$SIZE" = gpu ]; then FROM_SCRATCH=${FORGET_FROM_SCRATCH:-0}; else FROM_SCRATCH=${FORGET_FROM_SCRATCH:-1}; fi
LANE0=${FORGET_LANE0-"0 1"}   # set empty (FORGET_LANE0= FORGET_LANE1=) to train only ddpm and cond
LANE1=${FORGET_LANE1-"2 3"}
mkdir -p "$WORKDIR"
steps() { [ -n "${1:-}" ] && echo "--config.num_train_steps=$1" || true; }

run() {  # run <name> <core or -> <args...>
  local name=$1 core=$2; shift 2
  if [ -f "$WORKDIR/$name/model/card.json" ]; then echo "== $name: done"; return; fi
  if [ ! -d "$WORKDIR/$name/checkpoints" ] && [ -d "$TRAIN_STATE/$name/checkpoints" ]; then
    # a run saved into the repository by an earlier run (checkpoints/train_state/README.md)
    echo "== $name: continuing the saved run in $TRAIN_STATE/$name"
    mkdir -p "$WORKDIR/$name" && cp -r "$TRAIN_STATE/$name/." "$WORKDIR/$name/"
  fi
  echo "== $name: training ($(date -u +%H:%M:%S)), log $WORKDIR/$name.log"
  if [ "$core" = - ]; then
    $PY train/main.py --workdir="$WORKDIR/$name" "$@" >> "$WORKDIR/$name.log" 2>&1
  else
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c "$core" $PY train/main.py --workdir="$WORKDIR/$name" "$@" >> "$WORKDIR/$name.log" 2>&1
  fi
  echo "== $name: finished ($(date -u +%H:%M:%S))"
}

forget() {  # forget <core> <class>
  local init=""
  [ "$FROM_SCRATCH" = 1 ] || init="--config.init_from=$WORKDIR/mnist_ddpm/model"
  run "mnist_forget_$2" "$1" --config=train/configs/mnist_forget.py:$SIZE --config.only_class="$2" $init \
      $(steps "${STEPS_FORGET:-}")
}

lane() {  # lane <core> <first model: ddpm|cond> <forget classes>
  local core=$1 first=$2 classes=$3
  run "mnist_$first" "$core" --config=train/configs/mnist_$first.py:$SIZE \
      $(steps "$([ "$first" = ddpm ] && echo "${STEPS_DDPM:-}" || echo "${STEPS_COND:-}")")
  for c in $classes; do forget "$core" "$c"; done
}

if [ "$SIZE" = gpu ] || [ "${TRAIN_CLASSIFIER:-0}" = 1 ]; then
  run mnist_classifier - --config=train/configs/mnist_classifier.py:$SIZE $(steps "${STEPS_CLASSIFIER:-}")
fi
if [ "$SIZE" = cpu ] && [ "$(nproc)" -ge 2 ]; then
  lane 0 ddpm "$LANE0" & p0=$!
  lane 1 cond "$LANE1" & p1=$!
  wait $p0; wait $p1
else
  lane - ddpm "$LANE0 $LANE1"
  lane - cond ""
fi
if [ "${EXPORT:-1}" = 1 ]; then
  # all shipped forget classes (only new models are copied and measured)
  $PY -m train.export --workdir="$WORKDIR" --out="$OUT" --classes="${EXPORT_CLASSES:-0 1 2 3}"
fi
echo "== all done ($(date -u +%H:%M:%S))"
