"""Where to tune: random, magnitude, gradient and gradient+regrowth positions against PEFT LoRA and full
fine-tuning, on real GLUE-format tasks, several seeds and budgets. Resumable: one JSON line per run
in --results; a rerun skips finished runs and only writes the summary again.

    python python/positions_study.py --tasks SST-2 --seeds 0 1 --budgets lora:r=8 --max-train 4000
    python python/positions_study.py --tasks SST-2 MRPC RTE --seeds 0 1 2 --budgets lora:r=2 lora:r=8
    python python/positions_study.py --models minilm gemma --tasks SST-2 --lr-by-method gradient=1e-3

Methods (each on the same encoder, the classifier head always trained): `random`, `magnitude`,
`gradient` (calibrated on --calibration-batches training batches), `gradient+regrow` (gradient
positions, drop-and-regrow every --regrow-interval steps from --regrow-fraction, cosine decay),
`lora` (PEFT LoRA of the budget's rank: the same parameter count), `full`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune  # noqa: E402

METHODS = ("random", "magnitude", "gradient", "gradient+regrow", "lora", "full")


def per_key(pairs: list[str], cast=float) -> dict[str, object]:
    """["gradient=1e-3", "lora=3e-3"] -> {"gradient": 0.001, "lora": 0.003} (``cast`` applied to each value)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        out[key] = cast(value)
    return out


def setting(args, name: str, key: str):
    """--epochs / --max-len / --max-train: the plain value, or its --per-task override for this task."""
    plain = getattr(args, name)
    return getattr(args, f"{name}_by").get(key, plain)


def lr_of(args, method: str) -> float | None:
    """The learning rate a run uses: per method, else finetune.py's default for its --method."""
    return args.lr_by.get(method, args.lr)


def run_args(args, model: str, task: str, seed: int, budget: str, method: str) -> list[str]:
    argv = ["--data-dir", str(Path(args.data_root) / task), "--model", model, "--seed", str(seed),
            "--epochs", str(setting(args, "epochs", task)), "--max-len", str(setting(args, "max_len", task)),
            "--batch-size", str(args.batch_size)]
    if setting(args, "max_train", task):
        argv += ["--max-train", str(setting(args, "max_train", task))]
    if lr_of(args, method):
        argv += ["--lr", str(lr_of(args, method))]
    if method == "full":
        return argv + ["--method", "full"]
    if method == "lora":
        return argv + ["--method", "lora", "--lora-r", budget.split("=")[1]]
    position = method.split("+")[0]
    argv += ["--method", "apet", "--budget-like", budget, "--position", position,
             "--calibration-batches", str(args.calibration_batches)]
    if method.endswith("+regrow"):
        argv += ["--regrow-interval", str(args.regrow_interval), "--regrow-fraction", str(args.regrow_fraction)]
    return argv


def summarize(rows: list[dict], majority: dict[str, float]) -> str:
    lines = ["Majority class of each dev set: " + ", ".join(f"{t} {100 * m:.1f}%" for t, m in sorted(majority.items())),
             "", "| model | task | budget | method | runs | dev accuracy, mean ± std (%) | trainable | lr | epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, task in sorted({(r["model"], r["task"]) for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["task"] == task]
        budgets = sorted({r["study_budget"] for r in mine}, key=lambda b: (b == "—", b))
        for budget in budgets:  # "—" (full fine-tuning) last
            for method in METHODS:
                at = [r for r in mine if r["study_method"] == method and r["study_budget"] == budget]
                if not at:
                    continue
                acc = [100 * r["dev_accuracy"] for r in at]
                spread = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else " (one run)"
                lines.append(f"| {model} | {task} | {budget} | {method} | {len(acc)} | {statistics.mean(acc):.1f}{spread} | "
                             f"{at[0]['trainable']:,d} | {at[0]['lr']:g} | {at[0]['epochs']:g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--tasks", nargs="+", default=["SST-2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", default=["lora:r=2", "lora:r=8"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--models", "--model", nargs="+", default=["minilm"],
                    help="minilm, gemma (the causal LM Gemma 3 270M as a classifier) or model folders: the grid "
                         "runs on each")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--per-task", nargs="+", default=[], metavar="TASK:SETTING=VALUE",
                    help="override epochs, max_len, max_train or budgets (comma-separated) for one task, "
                         "e.g. RTE:epochs=3 RTE:max_len=128 RTE:budgets=lora:r=8")
    ap.add_argument("--lr", type=float, default=None, help="default: finetune.py's per --method default")
    ap.add_argument("--lr-by-method", nargs="+", default=[], metavar="METHOD=LR",
                    help="e.g. gradient=1e-3 gradient+regrow=1e-3 (part of a run's identity when resuming)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--regrow-interval", type=int, default=20)
    ap.add_argument("--regrow-fraction", type=float, default=0.3)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "positions.jsonl"))
    args = ap.parse_args(argv)
    args.lr_by = per_key(args.lr_by_method)
    args.epochs_by, args.max_len_by, args.max_train_by, args.budgets_by = {}, {}, {}, {}
    cast = {"epochs": float, "max_len": int, "max_train": int, "budgets": lambda v: v.split(",")}
    for key, value in per_key(args.per_task, str).items():
        task, _, name = key.partition(":")
        if name not in cast or not value:
            raise SystemExit(f"--per-task wants TASK:{'|'.join(cast)}=VALUE, got {key}={value}")
        getattr(args, f"{name}_by")[task] = cast[name](value)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    # a run is the same run only with the same settings: resuming after changing one reruns it
    identity = lambda r: (r["task"], r["seed"], r["study_budget"], r["study_method"], r["command"])  # noqa: E731
    seen = {identity(r) for r in done}
    # seeds outermost: a study cut short still has every task and method at the seeds it reached
    plan = [(mo, t, s, b, m) for s in args.seeds for mo in args.models for t in args.tasks for m in args.methods
            for b in (args.budgets_by.get(t, args.budgets) if m != "full" else ["—"])]
    current = []
    for model, task, seed, budget, method in plan:
        name = finetune.glue.task_for_folder(str(Path(args.data_root) / task)).name
        argv_run = run_args(args, model, task, seed, budget, method)
        command = " ".join(argv_run)
        if (name, seed, budget, method, command) in seen:
            current += [r for r in done if identity(r) == (name, seed, budget, method, command)][:1]
            continue
        result = finetune.run(finetune.parse_args(argv_run))
        result.update(study_method=method, study_budget=budget, command=command)
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        current.append(result)
        print(f"{model} {name} seed {seed} {budget} {method}: {100 * result['dev_accuracy']:.1f}%", flush=True)
    from scaling_study import majority_rate
    majority = {finetune.glue.task_for_folder(str(Path(args.data_root) / t)).name: majority_rate(str(Path(args.data_root) / t))
                for t in args.tasks}
    table = summarize(current, majority)  # this plan's runs only, not older settings in the same file
    print("\n" + table)
    out.with_suffix(".md").write_text(f"# python/positions_study.py\n\n`{' '.join(sys.argv)}`\n\n{table}\n")


if __name__ == "__main__":
    main()
