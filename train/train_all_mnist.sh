#!/usr/bin/env bash
# Train every shipped MNIST model, sequentially, on this machine, then copy them into checkpoints/.
#
#   DNGJAX_DATA_DIR=../shared/data bash train/train_all_mnist.sh        # sized for a 2-core CPU
#   SIZE=gpu bash train/train_all_mnist.sh                              # sized for one GPU (< 10 min)
#
# Resumable: rerun the same command after an interruption; finished models are skipped
# and unfinished ones continue from their last checkpoint in $WORKDIR.
# Step counts can be overridden per stage with STEPS_DDPM, STEPS_FORGET, STEPS_CLASSIFIER
# (or with files $WORKDIR/steps_ddpm etc., read when each stage starts).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-cpu}
WORKDIR=${WORKDIR:-workdir/$SIZE}
OUT=${OUT:-checkpoints/mnist}
CLASSES=${CLASSES:-"0 1 2 3"}
PY=${PYTHON:-python}
mkdir -p "$WORKDIR"
steps() {  # steps <stage> <env value>: env var, else $WORKDIR/steps_<stage>, else the config's default
  if [ -n "${2:-}" ]; then echo "--config.num_steps=$2";
  elif [ -f "$WORKDIR/steps_$1" ]; then echo "--config.num_steps=$(cat "$WORKDIR/steps_$1")"; fi
}
run() {  # run <name> <args...>
  local name=$1; shift
  if [ -f "$WORKDIR/$name/model/card.json" ]; then echo "== $name: done"; return; fi
  echo "== $name: training ($(date -u +%H:%M:%S))"
  $PY train/main.py --workdir="$WORKDIR/$name" "$@"
}
# forget-class models are fine-tuned from the unconditional model (set FORGET_FROM_SCRATCH=1 to
# train them from scratch instead; then raise their step count, e.g. STEPS_FORGET=3000).
run mnist_classifier --config=train/configs/mnist_classifier.py:$SIZE $(steps classifier "${STEPS_CLASSIFIER:-}")
run mnist_ddpm --config=train/configs/mnist_ddpm.py:$SIZE $(steps ddpm "${STEPS_DDPM:-}")
for c in $CLASSES; do
  if [ "${FORGET_FROM_SCRATCH:-0}" = 1 ]; then init=""; else init="--config.init_from=$WORKDIR/mnist_ddpm/model"; fi
  run mnist_forget_$c --config=train/configs/mnist_forget.py:$SIZE --config.only_class=$c $init \
      $(steps forget "${STEPS_FORGET:-}")
done
if [ "${EXPORT:-1}" = 1 ]; then
  $PY -m train.export --workdir="$WORKDIR" --out="$OUT" --classes="$CLASSES"
fi
echo "== all done ($(date -u +%H:%M:%S))"
