#!/usr/bin/env bash
# Train all shipped MNIST models on one GPU (meant to finish well under 10 minutes):
# classifier 3000 x 256, unconditional DDPM (mnist_unet(), ch 32, ~1.1 M params) 6000 x 128,
# forget-class models 0-3 fine-tuned from it for 1000 x 128 each; then export + quality eval.
#
#   pip install -e . "jax[cuda12]"
#   DNGJAX_DATA_DIR=../shared/data bash train/train_all_mnist_gpu.sh
#
# UNTESTED ON A GPU: written and checked for syntax only (no GPU was available when the shipped
# checkpoints were trained; those used the CPU sizes, see checkpoints/mnist/README.md).
# Writes to workdir/gpu and checkpoints/mnist_gpu (so it does not overwrite the shipped models);
# set OUT=checkpoints/mnist to replace them.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=gpu WORKDIR=${WORKDIR:-workdir/gpu} OUT=${OUT:-checkpoints/mnist_gpu} exec bash train/train_all_mnist.sh
