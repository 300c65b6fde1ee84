#!/usr/bin/env bash
# Downloads, here (with network), the wheels that scripts/gpu_bench.sh installs on a GPU machine that
# has none: the packages jaxpretrain imports at bench/train time that the GPU image lacks. The image
# (nvidia-h200: Python 3.12, jax 0.11.2 + CUDA 13 plugin, flax, optax, orbax-checkpoint, transformers,
# torch, absl-py, etils, cloudpickle, protobuf, psutil, pyyaml, tensorboard) has everything else.
#   grain, array-record, portpicker  the data loader (imported by the train loop) and its needs
#   ml-collections                   --config configs/gpt2.py and --config.a.b=v overrides
#   tensorboardX                     the train CLI's metric files (not needed by the bench)
#   pytest and its needs             the GPU-only tests (the image is not known to ship pytest)
# and, in .whl/pinned/, the pure-Python flax, optax and orbax-checkpoint that this checkout's suite
# passed with: gpu_bench.sh puts them first on the path only when its smoke run fails with the
# image's own (NNX changes quickly, and the image's versions may be newer than any tested here).
# Usage: bash scripts/gpu_wheels.sh   -> .whl/*.whl (git-ignored; carry ".whl" to the device)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  grain==0.2.18
  array-record==0.8.6
  portpicker==1.6.0
  ml-collections==1.1.0
  tensorboardX==2.6.5
  pytest==9.0.3
  pluggy==1.6.0
  iniconfig==2.3.0
  pygments==2.20.0
)
PINNED=($(python3 -c 'import importlib.metadata as md; print(" ".join(f"{n}=={md.version(n)}" for n in ("flax", "optax", "orbax-checkpoint")))'))
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p .whl/pinned
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl/pinned "${PINNED[@]}"
ls -la .whl .whl/pinned
du -sh .whl
