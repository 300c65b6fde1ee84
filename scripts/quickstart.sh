#!/usr/bin/env bash
# The README's first Quick start command: the whole path on the embedded default corpus, CPU only.
#   raw text (CPython's stdlib as FineWeb-Edu-style JSONL) -> Megatron .bin/.idx -> train the "tiny"
#   preset -> export a Hugging Face directory -> sample from it.
# Rerunning resumes training from its checkpoints (delete runs/tiny to start over).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m jaxpretrain.data.stdlib_corpus --output data/stdlib_jsonl
python -m jaxpretrain.preprocess --input "data/stdlib_jsonl/*.jsonl" --json-keys text \
  --output-prefix processed_data --output-path data/stdlib_gpt2 --workers 2 --append-eod
python -m jaxpretrain.train --config configs/gpt2.py:tiny
python -m jaxpretrain.export --checkpoint-dir runs/tiny/checkpoints --output runs/tiny/hf
python -m jaxpretrain.generate --model runs/tiny/hf --prompt "def read_config(path):" --max-new-tokens 48
