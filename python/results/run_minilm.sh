#!/usr/bin/env bash
# The committed MiniLM result (python/results/minilm.jsonl): SST-2 and RTE, one epoch on the first
# 4,000 (SST-2, shuffled) or all 2,490 (RTE) training examples, full dev sets, CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data}"
OUT=python/results/minilm.jsonl
for task in SST-2 RTE; do
  common=(--data-dir "$DATA/$task" --model minilm --max-train 4000 --epochs 1 --seed 0 --results "$OUT")
  [ "$task" = SST-2 ] && common+=(--max-len 64) || common+=(--max-len 128)
  python python/finetune.py "${common[@]}" --method full
  python python/finetune.py "${common[@]}" --method lora --lora-r 2
  for k in 1000 10000 82944; do   # 82,944 = LoRA r=2 on all linears of MiniLM-L6
    python python/finetune.py "${common[@]}" --method apet --num-params "$k"
  done
done
