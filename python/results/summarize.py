"""Print a markdown table of a finetune.py results file (one JSON object per line)."""

import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "python/results/minilm.jsonl"
rows = [json.loads(line) for line in open(path) if line.strip()]
print("| task | method | trainable params | train examples × epochs | dev accuracy | dev loss | train time (s) |")
print("|---|---|---|---|---|---|---|")
order = {"full": 0, "lora": 1, "dense-mask": 2, "apet": 3}
for r in sorted(rows, key=lambda r: (r["task"], order.get(r["method"], 9), r["trainable"])):
    print(f"| {r['task']} | {r['note']} | {r['trainable']:,d} | {r['train_examples']:,d} × {r['epochs']:g} | "
          f"{100 * r['dev_accuracy']:.1f}% ({r['dev_examples']}) | {r['dev_loss']:.3f} | {r['train_seconds']:.0f} |")
