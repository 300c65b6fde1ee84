#!/usr/bin/env bash
# Every GPU figure of issue 11 in one run of about 8 minutes, on a machine with no network:
#   0. installs the wheels in .whl/ (scripts/gpu_wheels.sh, run where there is network) when a package
#      jaxpretrain imports is missing, prints the card, driver and library versions, and smoke-tests
#      one tiny step (falling back from our XLA defaults and to pinned flax/optax/orbax if it fails);
#   1. python -m jaxpretrain.bench on GPT-2 124M, seq 1024, global batch 512: the seed's recipe
#      (dropout 0.1, cuDNN flash attention with dropout, micro-batch 32), without dropout at micro-batch
#      64 (with a jax.profiler trace summarised as the top XLA ops), the torch baseline on that shape
#      (scripts/bench_torch.py: transformers' GPT2LMHeadModel, bf16 autocast, SDPA, torch.compile,
#      fused AdamW);
#   2. the GPU-only tests (cuDNN attention dropout: masks, keep rate, expected value, backward mask;
#      after the headline figures, which matter most if the device window closes early), then the
#      A/Bs: scan_layers (compile time), XLA's own flags vs ours (JAXPRETRAIN_XLA_DEFAULTS=0), remat at
#      micro-batch 128, micro-batch 32, the plain loss (chunk_size 0), command buffers off and with
#      while loops, Triton GEMMs off;
#   3. one markdown table (and the profile's) ready for docs/performance.md.
# Runs go in that order, each under its own `timeout`; once GPU_BENCH_BUDGET_S (default 450) seconds
# have passed, the rest are listed as skipped. Everything goes to $OUT (if set, else runs/gpu_bench):
# gpu_bench.log (all output), results.jsonl (one line per run) and table.md. Traces stay in /tmp.
#
#   bash scripts/gpu_bench.sh                 # on the GPU machine (carry .whl)
#   GPU_BENCH_TINY=1 bash scripts/gpu_bench.sh  # CPU dry run: tiny shapes, same steps, a minute or two
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-runs/gpu_bench}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_bench.log
RESULTS=$OUT_DIR/results.jsonl
: >"$LOG"
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_BENCH_BUDGET_S:-450}
TRACE_DIR=${GPU_BENCH_TRACE_DIR:-/tmp/gpu_bench_trace}

# ------------------------------------------------------------------------------------------ shapes
if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
  SHAPE=(--config configs/gpt2.py --config.model.n_layer=2 --config.model.n_embd=64 --config.model.n_head=4
         --config.model.n_positions=128 --config.model.vocab_size=1024 --config.model.vocab_multiple=64
         --config.model.dtype=float32 --config.dataset.seq_length=128 --config.step_scheduler.global_batch_size=16)
  MB=(4 8 16)  # stand-ins for micro-batches 32, 64, 128
  STEPS=(--steps 2 --warmup 1)
  T_RUN=300
else
  SHAPE=(--config configs/gpt2.py --config.step_scheduler.global_batch_size=512)  # 124m: bf16, vocab 50304, seq 1024
  MB=(32 64 128)
  STEPS=(--steps 4 --warmup 1)
  T_RUN=150
fi
NODROP=(--config.model.dropout=0.0)

elapsed() { echo $(($(date +%s) - START)); }
over_budget() { [ "$(elapsed)" -ge "$BUDGET" ]; }

SKIPPED=()
# run NAME SECONDS COMMAND...: one part under its own timeout; its JSON line (if any) goes to results.jsonl.
run() {
  local name=$1 limit=$2
  shift 2
  if over_budget; then
    echo "== $name: skipped (budget of ${BUDGET}s spent)"
    SKIPPED+=("$name")
    return
  fi
  local left=$((BUDGET + 60 - $(elapsed)))  # a started run may overrun the budget by a minute at most
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name ($(elapsed)s in, limit ${limit}s): $*"
  local tmp
  tmp=$(mktemp)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$tmp" | grep -v -E "^\{\"bench\"" | tail -n 60
  local rc=${PIPESTATUS[0]}
  local json
  json=$(grep -E '^\{"bench"' "$tmp" | tail -n 1)
  if [ -n "$json" ]; then
    $PY -c 'import json,sys; r=json.loads(sys.argv[1]); r["run"]=sys.argv[2]; print(json.dumps(r))' "$json" "$name" >>"$RESULTS"
  else
    $PY -c 'import json,sys; print(json.dumps({"run": sys.argv[1], "failed": int(sys.argv[2])}))' "$name" "$rc" >>"$RESULTS"
    echo "== $name: no result (exit $rc)"
  fi
  rm -f "$tmp"
}
# check NAME SECONDS COMMAND...: a test part; its pass/fail goes into the table's notes.
CHECKS=()
check() {
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(elapsed)s in, limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tail -n 30
  local rc=${PIPESTATUS[0]}
  CHECKS+=("$name: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)")")
}
ours() { local name=$1 limit=$2; shift 2; run "$name" "$limit" "$PY" -m jaxpretrain.bench "${SHAPE[@]}" "${STEPS[@]}" --json "$@"; }
torchb() { local name=$1 limit=$2; shift 2; run "$name" "$limit" "$PY" scripts/bench_torch.py "${SHAPE[@]}" "${STEPS[@]}" --json "$@"; }

# --------------------------------------------------------------------------------- 0. environment
missing=$($PY - <<'EOF'
import importlib.util
need = {"grain": "grain", "array_record": "array-record", "portpicker": "portpicker", "ml_collections": "ml-collections",
        "tensorboardX": "tensorboardX", "jax": "jax", "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
        "transformers": "transformers", "safetensors": "safetensors", "torch": "torch", "yaml": "pyyaml",
        "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments"}
def found(m):
    try:
        return importlib.util.find_spec(m) is not None
    except ImportError:
        return False
print(" ".join(d for m, d in need.items() if not found(m)))
EOF
)
if [ -n "$missing" ]; then
  echo "== missing packages: $missing"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "== wheel install failed"
  else
    echo "== no .whl/ here: run scripts/gpu_wheels.sh where there is network and carry .whl"
  fi
fi
echo "== $(date -u '+%Y-%m-%d %H:%M UTC') | $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
timeout 120 $PY - <<'EOF'
import importlib.metadata as md, os
import jax
print("jax", jax.__version__, "| devices", jax.devices(), "| XLA_FLAGS as set by the CLIs: see each run")
for name in ("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "torch", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
from jaxpretrain import xla_env
print("jaxpretrain GPU XLA defaults:", " ".join(f"{f}={v}" for f, v, _ in xla_env.GPU_DEFAULTS), "| applied:", xla_env.gpu_expected())
EOF

# ------------------------------------------------------------------------- 0b. smoke: one tiny step
# One step of a tiny bf16 model on the device before any figure (about half a minute): it catches an
# XLA flag this jaxlib does not know (XLA aborts on unknown flags, which would fail every run) and an
# NNX change in the image's flax, and falls back instead of losing the whole window: first without our
# XLA defaults, then with the flax/optax/orbax-checkpoint that the suite passed with (.whl/pinned/).
SMOKE=(--config configs/gpt2.py --config.model.n_layer=2 --config.model.n_embd=64 --config.model.n_head=4
       --config.model.n_positions=128 --config.model.vocab_size=1024 --config.model.vocab_multiple=64
       --config.model.dropout=0.0 --config.dataset.seq_length=128 --config.step_scheduler.global_batch_size=8
       --config.step_scheduler.local_batch_size=8 --steps 1 --warmup 1)
[ "${GPU_BENCH_TINY:-0}" = 1 ] && SMOKE+=(--config.model.dtype=float32)
smoke() {
  echo "== smoke ($(elapsed)s in)${1:+: $1}"
  timeout --kill-after=10 150 $PY -m jaxpretrain.bench "${SMOKE[@]}" 2>&1 | tail -n 25
  return "${PIPESTATUS[0]}"
}
SMOKE_NOTE="smoke: passed"
if ! smoke; then
  if JAXPRETRAIN_XLA_DEFAULTS=0 smoke "without jaxpretrain's XLA defaults"; then
    export JAXPRETRAIN_XLA_DEFAULTS=0
    SMOKE_NOTE="smoke: passed only without jaxpretrain's XLA defaults (every run below has them off)"
  elif ls .whl/pinned/*.whl >/dev/null 2>&1 \
      && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-pinned .whl/pinned/*.whl; then
    IMAGE_PYTHONPATH=${PYTHONPATH:-}
    export PYTHONPATH=/tmp/site-pinned${PYTHONPATH:+:$PYTHONPATH}
    if smoke "with the pinned $(ls .whl/pinned | tr '\n' ' ')"; then
      SMOKE_NOTE="smoke: passed only with the pinned flax/optax/orbax-checkpoint of .whl/pinned (used below)"
    elif JAXPRETRAIN_XLA_DEFAULTS=0 smoke "pinned, without jaxpretrain's XLA defaults"; then
      export JAXPRETRAIN_XLA_DEFAULTS=0
      SMOKE_NOTE="smoke: passed only with the pinned packages and without jaxpretrain's XLA defaults (used below)"
    else
      export PYTHONPATH=$IMAGE_PYTHONPATH  # the pinned packages did not help: the image's own again
      SMOKE_NOTE="smoke: FAILED every way (see the log); the runs go ahead with the image's packages"
    fi
  else
    SMOKE_NOTE="smoke: FAILED (no .whl/pinned to fall back to; see the log); the runs go ahead"
  fi
fi
echo "== $SMOKE_NOTE"
CHECKS+=("$SMOKE_NOTE")

# ------------------------------------------------------------------------------ 1-2. benchmarks and GPU tests
L=--config.step_scheduler.local_batch_size
rm -rf "$TRACE_DIR"
ours recipe "$T_RUN" "$L=${MB[0]}"                                                 # the seed's recipe
if tail -n 1 "$RESULTS" | grep -q '"failed"'; then  # cuDNN's dropout attention did not run: the spelled-out one
  ours recipe-xla-attention "$T_RUN" "$L=${MB[0]}" --config.model.attention_impl=xla
fi
ours nodrop-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}" --profile "$TRACE_DIR" --profile-steps 2 --top 20
torchb torch-nodrop-mb${MB[1]} $((T_RUN + 60)) "${NODROP[@]}" "$L=${MB[1]}"
if tail -n 1 "$RESULTS" | grep -q '"failed"'; then  # torch.compile did not make it: eager torch, labelled so
  torchb torch-eager-nodrop-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}" --compile=false
fi
# the GPU-only tests after the headline figures (a device window may close early), before the A/Bs
# -o addopts=: one process (the GPU image has no pytest-xdist, and one GPU wants one test process)
check gpu-tests 150 $PY -m pytest tests/test_attention_gpu.py tests/test_loss.py -o addopts= -q -x -p no:cacheprovider -rs
ours scan-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}" --config.model.scan_layers=true
JAXPRETRAIN_XLA_DEFAULTS=0 ours xla-defaults-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}"
ours remat-mb${MB[2]} "$T_RUN" "${NODROP[@]}" "$L=${MB[2]}" --config.model.remat=true --config.model.remat_policy=dots_with_no_batch_dims_saveable
ours nodrop-mb${MB[0]} "$T_RUN" "${NODROP[@]}" "$L=${MB[0]}"
ours plain-loss-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}" --config.loss_fn.chunk_size=0
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" ours cmdbuf-off-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" ours cmdbuf-while-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" ours triton-off-mb${MB[1]} "$T_RUN" "${NODROP[@]}" "$L=${MB[1]}"

# ------------------------------------------------------------------------------------------ 3. table
$PY scripts/bench_table.py "$RESULTS" --skipped "${SKIPPED[*]:-}" --checks "${CHECKS[@]:-}" | tee "$OUT_DIR/table.md"
echo "== done in $(elapsed)s; files in $OUT_DIR"
