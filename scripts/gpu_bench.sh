#!/usr/bin/env bash
# The device check for a session that has a GPU: the 124m preset's real train step on synthetic
# tokens, at the seed's micro-batch (32 x 1024 per GPU) and global batch 512 (grad accumulation 16),
# then a few variants. Prints one `tokens/s` line per run; copy the figures to docs/performance.md
# with the date and the card (nvidia-smi's name).
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run() { echo "== $*"; timeout 300 python -m jaxpretrain.bench --config configs/gpt2.py "$@" 2>&1 | tail -2; }
run --steps 10 --warmup 3                                             # the seed's recipe: bf16, cuDNN flash, vocab 50304
run --steps 10 --warmup 3 --config.model.dropout=0.0                  # llm.c-style: no dropout
run --steps 10 --warmup 3 --config.model.dropout=0.0 --config.step_scheduler.local_batch_size=64
run --steps 10 --warmup 3 --config.model.dropout=0.0 --config.model.remat=true --config.step_scheduler.local_batch_size=128
