#!/usr/bin/env bash
# Downloads, here (with network), the wheels that scripts/gpu_bench.sh installs on a GPU machine that
# has none: the packages jaxpretrain imports at bench/train time that the GPU image lacks. The image
# (nvidia-h200: Python 3.12, jax 0.11.2 + CUDA 13 plugin, flax, optax, orbax-checkpoint, transformers,
# torch, absl-py, etils, cloudpickle, protobuf, psutil, pyyaml, tensorboard) has everything else.
#   grain, array-record, portpicker  the data loader (imported by the train loop) and its needs
#   ml-collections                   --config configs/gpt2.py and --config.a.b=v overrides
#   tensorboardX                     the train CLI's metric files (not needed by the bench)
# Usage: bash scripts/gpu_wheels.sh   -> .whl/*.whl (git-ignored; carry ".whl" to the device)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  grain==0.2.18
  array-record==0.8.6
  portpicker==1.6.0
  ml-collections==1.1.0
  tensorboardX==2.6.5
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
