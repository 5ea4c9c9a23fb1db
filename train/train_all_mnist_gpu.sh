#!/usr/bin/env bash
# Train all shipped MNIST models on one GPU (meant to finish well under 10 minutes):
# classifier 3000 x 256, unconditional and class-conditional DDPMs (mnist_unet(), ch 32, ~1.1 M params) 6000 x 128,
# forget-class models 0-3 fine-tuned from it for 1000 x 128 each; then export + quality eval.
#
#   pip install -e . "jax[cuda12]"
#   DNGJAX_DATA_DIR=../shared/data bash train/train_all_mnist_gpu.sh
#
# NEVER RUN ON A GPU, so the time budget is unmeasured (no GPU was available; the shipped checkpoints
# used the CPU sizes, see checkpoints/mnist/README.md). The pipeline itself, at these GPU model sizes,
# ran end to end on the 2-core CPU with the step counts cut (6 min 45 s, before the cond model was added):
#   STEPS_DDPM=6 STEPS_COND=6 STEPS_FORGET=3 STEPS_CLASSIFIER=6 FORGET_LANE0=0 FORGET_LANE1= EXPORT=0 WORKDIR=/tmp/w OUT=/tmp/o \
#     bash train/train_all_mnist_gpu.sh
#   python -m train.export --workdir=/tmp/w --out=/tmp/o --classes=0 --n_uncond=20 --n_per_class=4 --n_forget=20 --steps=5
# Writes to workdir/gpu and checkpoints/mnist_gpu (so it does not overwrite the shipped models);
# set OUT=checkpoints/mnist to replace them.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=gpu WORKDIR=${WORKDIR:-workdir/gpu} OUT=${OUT:-checkpoints/mnist_gpu} exec bash train/train_all_mnist.sh
