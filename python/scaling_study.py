"""The paper's scaling study with APET: dev accuracy against the number of tuned parameters K.

    python python/scaling_study.py --data-dir ../shared/data/SST-2 --models minilm --ks 10 100 1000 10000 100000 \\
        --positions random rows cols blocks --seeds 0 1 --max-train 4000

For every model, position scheme, K and seed it runs python/finetune.py's APET training (in this
process), plus full fine-tuning per model and seed as the ceiling. Results are appended to
<out>/results.jsonl one line per run; a rerun skips the points already there, so a study can be
stopped and resumed. It writes <out>/summary.md (table and thresholds) and <out>/accuracy_vs_k.png.

Thresholds (Su et al., EMNLP 2023, claims 2 and 3), per task and model, on the mean over seeds of
the `random` scheme: the smallest K whose accuracy beats random guessing (the dev set's majority
class) by --margin points, and the smallest K within 1 point of full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune  # noqa: E402
import glue  # noqa: E402

KEY_FIELDS = ("task", "model", "method", "position", "num_params", "seed", "max_train", "epochs")


def point_key(r: dict) -> tuple:
    return tuple(r.get(f) for f in KEY_FIELDS)


def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plan(args) -> list[list[str]]:
    base = ["--data-dir", args.data_dir, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--max-len", str(args.max_len)] + (["--max-train", str(args.max_train)] if args.max_train else [])
    runs = []
    for model in args.models:
        for seed in args.seeds:
            runs.append(base + ["--model", model, "--method", "full", "--seed", str(seed)])
            for position in args.positions:
                for k in args.ks:
                    runs.append(base + ["--model", model, "--method", "apet", "--num-params", str(k),
                                        "--position", position, "--seed", str(seed)])
    return runs


def majority_rate(data_dir: str) -> float:
    task = glue.task_for_folder(data_dir)
    labels = glue.load_local(task, data_dir)["validation"]["labels"]
    return max(Counter(labels).values()) / len(labels)


def thresholds(rows: list[dict], guess: float, margin: float) -> dict:
    out = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        full = [r["dev_accuracy"] for r in mine if r["method"] == "full"]
        by_k = defaultdict(list)
        for r in mine:
            if r["method"] == "apet" and r["position"] == "random":
                by_k[r["num_params"]].append(r["dev_accuracy"])
        means = {k: statistics.mean(v) for k, v in sorted(by_k.items())}
        beat = next((k for k, a in means.items() if a >= guess + margin / 100), None)
        near = next((k for k, a in means.items() if full and a >= statistics.mean(full) - 0.01), None)
        out[model] = dict(full_ft=statistics.mean(full) if full else None, k_beats_guess=beat, k_near_full=near,
                          mean_by_k=means)
    return out


def summarize(rows: list[dict], out: Path, guess: float, margin: float) -> str:
    lines = ["| model | position | K | seeds | dev accuracy (mean) |", "|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["method"] if r["method"] == "full" else r["position"], r["num_params"] or 0)].append(r)
    for (model, pos, k), rs in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1], x[0][2])):
        lines.append(f"| {model} | {pos} | {k:,d} | {len(rs)} | {100 * statistics.mean(r['dev_accuracy'] for r in rs):.1f}% |")
    th = thresholds(rows, guess, margin)
    lines += ["", f"Random guessing (majority class of the dev set): {100 * guess:.1f}%. Thresholds on the mean over "
                  f"seeds of the random scheme; 'none' = no K tried reached it:", ""]
    for model, t in th.items():
        full = "n/a" if t["full_ft"] is None else f"{100 * t['full_ft']:.1f}%"
        lines.append(f"- {model}: full fine-tuning {full}; smallest K beating random guessing by {margin:g} points: "
                     f"{t['k_beats_guess'] or 'none'}; smallest K within 1 point of full fine-tuning: "
                     f"{t['k_near_full'] or 'none'}")
    text = "\n".join(lines)
    (out / "summary.md").write_text(f"# Scaling study\n\n{text}\n")
    (out / "thresholds.json").write_text(json.dumps(th, indent=1, default=str))
    return text


def plot(rows: list[dict], out: Path, guess: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for pos in sorted({r["position"] for r in mine if r["method"] == "apet"}):
            by_k = defaultdict(list)
            for r in mine:
                if r["method"] == "apet" and r["position"] == pos:
                    by_k[r["num_params"]].append(r["dev_accuracy"])
            ks = sorted(by_k)
            ax.plot(ks, [100 * statistics.mean(by_k[k]) for k in ks], marker="o", label=pos)
        full = [r["dev_accuracy"] for r in mine if r["method"] == "full"]
        if full:
            ax.axhline(100 * statistics.mean(full), color="k", ls="--", label="full fine-tuning")
        ax.axhline(100 * guess, color="gray", ls=":", label="random guess")
        ax.set_xscale("log")
        ax.set_xlabel("tuned parameters K")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(model if len(model) < 30 else "…" + model[-28:])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="a GLUE-format task folder")
    ap.add_argument("--models", nargs="+", default=["tiny-bert", "minilm"],
                    help="tiny-bert, minilm, or local model folders (larger ones when a GPU is there)")
    ap.add_argument("--ks", nargs="+", type=int, default=[10, 100, 1000, 10000, 100000, 1000000],
                    help="numbers of tuned parameters (log-spaced)")
    ap.add_argument("--positions", nargs="+", default=["random", "rows", "cols", "blocks"],
                    choices=["random", "rows", "cols", "blocks"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--max-train", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--margin", type=float, default=2.0, help="points above random guessing that count as beating it")
    ap.add_argument("--out", default="python/results/scaling")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {point_key(r) for r in load_results(results)}
    for argv_run in plan(args):
        run_args = finetune.parse_args(argv_run + ["--results", str(results)])
        probe = dict(task=(run_args.task or glue.task_for_folder(run_args.data_dir).name), model=run_args.model,
                     method=run_args.method, position=run_args.position, num_params=run_args.num_params,
                     seed=run_args.seed, max_train=run_args.max_train, epochs=run_args.epochs)
        if point_key(probe) in done:
            print(f"skip (done): {probe}", file=sys.stderr)
            continue
        finetune.run(run_args)
    rows = load_results(results)
    guess = majority_rate(args.data_dir)
    print(summarize(rows, out, guess, args.margin))
    plot(rows, out, guess)
    print(f"wrote {out}/results.jsonl, summary.md, thresholds.json, accuracy_vs_k.png")


if __name__ == "__main__":
    main()
