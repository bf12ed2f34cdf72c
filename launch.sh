#!/usr/bin/env bash
# Launch tristage stages through `accelerate launch`.
#
#   ./launch.sh demo [OUT_DIR]                     the offline demo (single process)
#   ./launch.sh stage1|stage2|stage3 [ACCEL_ARGS...] [-- key=value ...]
#   ./launch.sh all [ACCEL_ARGS...] [-- key=value ...]
#   ./launch.sh stage2 --caption [ACCEL_ARGS...] [-- key=value ...]   (or CAPTION=1 ./launch.sh ...)
#
# Each stage runs its caching pass, then training, with configs/<stage>.yaml.  With --caption
# (or CAPTION=1), stage 2 first runs `tristage caption`: the VLM writes caption.output, which
# the stage-2 config's data.source.captions reads (stages 1 and 3 have no caption file).  `all`
# runs the three in order; each stage's config names the previous stage's final/ as
# init_from.  ACCEL_ARGS pass straight to `accelerate launch`, e.g.
#   ./launch.sh stage2 --config_file configs/accelerate/ddp.yaml --num_processes 8
#   ./launch.sh stage2 --config_file configs/accelerate/multinode.yaml \
#       --num_machines 4 --machine_rank "$RANK" --main_process_ip "$MASTER" --main_process_port 29500
# Overrides after `--` apply to every stage run, e.g. -- train.max_steps=1000.
set -euo pipefail
cd "$(dirname "$0")"

declare -A CONFIG=(
  [stage1]=configs/stage1_imagenet.yaml
  [stage2]=configs/stage2_sam_llava.yaml
  [stage3]=configs/stage3_aesthetic.yaml
)

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
target=$1; shift

if [ "$target" = demo ]; then
  exec accelerate launch --num_processes 1 -m tristage demo --out "${1:-demo_out}"
fi

accel=() overrides=() caption=${CAPTION:-0}
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; overrides=("$@"); break; fi
  if [ "$1" = --caption ]; then caption=1; shift; continue; fi
  accel+=("$1"); shift
done

run_stage() {
  local config=${CONFIG[$1]}
  if [ "$caption" = 1 ] && [ "$1" = stage2 ]; then
    accelerate launch "${accel[@]}" -m tristage caption "$config" "${overrides[@]}"
  fi
  accelerate launch "${accel[@]}" -m tristage cache "$config" "${overrides[@]}"
  accelerate launch "${accel[@]}" -m tristage train "$config" "${overrides[@]}"
}

case "$target" in
  stage1|stage2|stage3) run_stage "$target" ;;
  all) for s in stage1 stage2 stage3; do run_stage "$s"; done ;;
  *) usage ;;
esac
