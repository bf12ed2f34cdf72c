#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run, within 8 minutes on one H100/H200 (every figure has
# its own time limit; together they are 480 s).  Each XL figure builds the model twice (bare loop and
# Trainer) and ends with a full checkpoint (~10 GB) and final/ written to the temp folder.  Prints one JSON line per figure on stdout (figure = its name; a
# figure that fails or runs out of time prints {"figure": ..., "error": ...}); logs go to $LOGS.
#
#   bench/gpu.sh              PixArt-XL/2, bf16 (what RESULTS.md reports)
#   bench/gpu.sh --dry-run    the same Python paths with a tiny model, on the CPU if there is no GPU
#
# Figures (tristage bench train: the real Trainer and a bare loop on a synthetic feature cache):
#   ddp_256, ddp_256_compile, ddp_512, ddp_512_compile   one process (DDP path), compile off / on
#   fsdp_256_20steps   a 20-step run under train.parallelism=fsdp: torchrun with one process, so the
#                      model is fully_shard-ed over a 1-rank mesh (DTensor weights, MixedPrecisionPolicy
#                      bf16, sharded DCP checkpoint, final/ from the gathered EMA)
#
# A bare GPU box whose python has torch, accelerate and transformers but not diffusers, webdataset or
# omegaconf: put their wheels in bench/wheels/ (or $TRISTAGE_WHEELS) and they are installed from there,
# without network, into a private folder on PYTHONPATH.  Fill the folder on any machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d bench/wheels \
#     diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 importlib_metadata==8.7.0
# (--python-version: the box's python; wandb is not needed, the benchmark runs with tracking disabled.
# bench/wheels/ is git-ignored: carry it with the tree.)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = --dry-run ] && DRY=1
LOGS=${LOGS:-/tmp/tristage-gpu}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}

WHEELS=${TRISTAGE_WHEELS:-bench/wheels}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tristage-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/tristage-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled HF_HUB_OFFLINE=1

if [ $DRY = 1 ]; then  # seconds, not minutes: every figure's Python path, tiny
  SHAPE=(--size tiny --caption-channels 32 --text-tokens 8 --steps 2 --window 2 --repeats 1)
  B256=(--resolution 64 --batch 2) B512=(--resolution 128 --batch 2) LIMIT=300 FSDP_STEPS=4
else  # PixArt-XL/2 with T5-XXL-wide captions (120 tokens x 4096)
  SHAPE=(--size XL/2 --steps 8 --window 4 --repeats 1)
  B256=(--resolution 256 --batch 32) B512=(--resolution 512 --batch 16) LIMIT=80 FSDP_STEPS=16
fi

tree() {  # PID and every process below it (collected before anything is killed)
  echo "$1"
  local child
  for child in $(ps -o pid= --ppid "$1"); do tree "$child"; done
}

limited() {  # SECONDS CMD...: CMD, SIGKILLed with all its processes (torchrun's ranks too) after SECONDS
  local limit=$1 tenths=0
  shift
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ $tenths -ge $((limit * 10)) ]; then
      kill -KILL $(tree "$pid") 2>/dev/null
      wait "$pid"
      return 137
    fi
    sleep 0.1
    tenths=$((tenths + 1))
  done
  wait "$pid"
}

figure() {  # NAME SECONDS ARGS...: one `tristage bench train`, its JSON line (or an error line)
  local name=$1 limit=$2; shift 2
  local log=$LOGS/$name.log
  limited "$limit" "$PY" -m tristage bench train "$@" --label "$name" >"$log" 2>&1
  local rc=$?
  local line
  line=$(tail -n 1 "$log")
  if [ $rc = 0 ] && [ "${line:0:1}" = "{" ]; then
    echo "$line"
  else
    echo "{\"figure\": \"$name\", \"error\": \"exit $rc (137: out of time)\", \"log\": \"$log\"}"
  fi
}

echo "{\"figure\": \"device\", \"dry_run\": $DRY, \"date\": \"$(date -u +%FT%TZ)\", \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)\"}"
figure ddp_256 $LIMIT "${SHAPE[@]}" "${B256[@]}"
figure ddp_512 $LIMIT "${SHAPE[@]}" "${B512[@]}"
# 20 steps: --window untimed + --steps timed (the Trainer's metric windows).
figure fsdp_256_20steps $((LIMIT + 20)) "${SHAPE[@]}" "${B256[@]}" --parallelism fsdp --processes 1 \
  --window 4 --steps "$FSDP_STEPS"
figure ddp_256_compile $((LIMIT + 30)) "${SHAPE[@]}" "${B256[@]}" --compile
figure ddp_512_compile $((LIMIT + 30)) "${SHAPE[@]}" "${B512[@]}" --compile
