#!/usr/bin/env bash
# The causal-LM experiment: SmolLM2-135M-Instruct on Rotten Tomatoes, 512 train / 200 held out, 1 epoch,
# one arm per process (so each arm's peak RSS is its own), fp32 base then a 4-bit nf4 base.
# Resumable: an arm with results is skipped, and so is one another live run of this script is running.
# Usage: bash scripts/causal_lm_rotten_tomatoes.sh [OUT [LABEL,LABEL,...]]  (the labels: which arms, in that order)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/causal_lm_rt}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON=(--model smollm2 --task rotten_tomatoes --n-train 512 --n-eval 200 --epochs 1 --compare none --no-progress)
QKVO=q_proj,k_proj,v_proj,o_proj
ARMS=(
  "zeroshot|--method zeroshot"
  "lora_qkvo|--method lora --r 8 --targets $QKVO"
  "lora_sb|--method lora_sb"
  "zeroshot_4bit|--method zeroshot --quantize 4bit"
  "lora_sb_4bit|--method lora_sb --quantize 4bit"
  "lora_qkvo_4bit|--method lora --r 8 --targets $QKVO --quantize 4bit"
  "loldu|--method loldu"
  "hut|--method hut"
  "lora_all|--method lora --r 8"
  "loldu_4bit|--method loldu --quantize 4bit"
  "hut_4bit|--method hut --quantize 4bit"
  # LoRA-SB at >= 20x fewer values than LoRA r=8 on q,k,v,o (921,600): r=12 on all 7 projections is 30,240
  "lora_sb_r12|--method lora_sb --r 12"
  "lora_sb_r12_4bit|--method lora_sb --r 12 --quantize 4bit"
  "lora_sb_r12_lr5e-3|--method lora_sb --r 12 --lr 5e-3"
)
if [ -n "${2:-}" ]; then  # reorder / select arms by label
  SELECTED=()
  for want in ${2//,/ }; do
    for arm in "${ARMS[@]}"; do [ "${arm%%|*}" = "$want" ] && SELECTED+=("$arm"); done
  done
  ARMS=("${SELECTED[@]}")
fi
for arm in "${ARMS[@]}"; do
  label="${arm%%|*}"; flags="${arm#*|}"
  dir="$OUT/$label"
  [ -f "$dir/results.json" ] && { echo "skip $label (done)"; continue; }
  # a lock folder (mkdir is atomic) lets several runs of this script share the arms; a lock whose
  # process is gone (an interrupted run) is taken over
  lock="$OUT/$label.lock"
  mkdir -p "$OUT"
  if ! mkdir "$lock" 2>/dev/null; then
    owner="$(cat "$lock/pid" 2>/dev/null || true)"
    if [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null; then echo "skip $label (running in $owner)"; continue; fi
  fi
  echo $$ > "$lock/pid"
  echo "=== $(date -u +%H:%M:%S) $label: ortho-adapters finetune ${COMMON[*]} $flags --output-dir $dir"
  # shellcheck disable=SC2086
  .venv/bin/ortho-adapters finetune "${COMMON[@]}" $flags --output-dir "$dir" > "$OUT/$label.log" 2>&1 \
    || echo "FAILED $label (see $OUT/$label.log)"
  grep -A2 "^| arm" "$OUT/$label.log" | tail -1
  rm -rf "$lock"
done
