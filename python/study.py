"""The one grid runner for fine-tuning studies (the scaling study, where to tune, learning-rate probes):
models x tasks x seeds x budgets x methods x learning rates, each point one python/finetune.py run
(transformers' Trainer). Resumable: one JSON line per run in --results; a run is identified by its task,
seed, budget, method and full command, so a rerun skips finished runs (and reruns a point whose settings
changed) and only writes the summary again.

    python python/study.py --tasks SST-2 --seeds 0 1 2 --budgets lora:r=2 lora:r=8 --max-train 4000
    python python/study.py --models minilm gemma --tasks SST-2 --budgets k=10000 k=100000 \
        --methods random rows magnitude lora --max-train 2000 --lrs 1e-3 1e-2 --seeds 0     # a two-rate probe

Budgets: `lora:r=N` (as many parameters as PEFT LoRA of rank N on all linears), `k=N` (N tuned scalars;
LoRA then gets the rank whose count is closest), `density=X` (APET schemes only: X of each linear's weights, a
candidate default) or `default` (finetune.py's defaults: APET's K = 10^5, LoRA's --lora-r; with no --lr either,
each method runs exactly as a newcomer's first run would). Methods (each on the same encoder, the classifier head
always trained): position schemes `random`, `rows`, `cols`, `blocks`, `magnitude`, `gradient` (calibrated
on --calibration-batches training batches), `gradient+regrow` (drop-and-regrow every --regrow-interval
steps from --regrow-fraction, cosine decay); `lora` (PEFT LoRA at the budget's count); `full`.

The summary (printed, and written next to --results as .md) gives per model, task and budget each
method's mean ± std over seeds, and the spread of the APET schemes' means (max - min) with a seed-bootstrap
95% interval, also divided by (LoRA's mean - 50): how much "where" matters against what LoRA gains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune  # noqa: E402
from apet_kernels.schemes import SCHEMES as POSITION_SCHEMES  # noqa: E402

SCHEMES = tuple(POSITION_SCHEMES) + ("gradient+regrow",)  # apet_kernels.schemes, and gradient with regrowth
METHODS = SCHEMES + ("lora", "full", "head")
# gradient variants: gradient:OPTION[:OPTION...][+regrow], options signed | snip | xnorm | corr | squared (the score), capN (at
# most N x K/out positions per row), ccapN (per column, N x K/in), warmN (train the head N steps before calibrating)
GRADIENT_OPTIONS = {"signed": ["--gradient-score", "signed"], "snip": ["--gradient-score", "snip"],
                    "xnorm": ["--gradient-score", "xnorm"], "corr": ["--gradient-score", "corr"],
                    "squared": ["--gradient-score", "squared"]}


def gradient_variant_args(method: str) -> list[str]:
    """finetune.py's arguments for a gradient variant's options (``gradient:signed:cap2`` ...)."""
    scheme = method.split("+")[0]
    out = []
    for option in scheme.split(":")[1:]:
        if option in GRADIENT_OPTIONS:
            out += GRADIENT_OPTIONS[option]
        elif option.startswith("cap") and option[3:].replace(".", "", 1).isdigit():
            out += ["--row-cap", option[3:]]
        elif option.startswith("ccap") and option[4:].replace(".", "", 1).isdigit():
            out += ["--col-cap", option[4:]]
        elif option.startswith("warm") and option[4:].isdigit():
            out += ["--calibration-warmup", option[4:]]
        else:
            raise SystemExit(f"unknown gradient option {option!r} in {method!r}: signed, snip, xnorm, corr, squared, capN, ccapN, "
                           f"warmN")
    return out


def method_name(text: str) -> str:
    """argparse type for --methods: one of METHODS, or a gradient variant (checked here, before any run)."""
    if text in METHODS:
        return text
    if text.startswith("gradient:") and text.split("+", 1)[1:] in ([], ["regrow"]):
        gradient_variant_args(text)
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(METHODS)} or gradient:OPTIONS[+regrow]")


def is_scheme(method: str) -> bool:
    return method in SCHEMES or method.startswith("gradient:")


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
    """The learning rate a run uses without --lrs: per method, else finetune.py's default for its --method."""
    return args.lr_by.get(method, args.lr)


def budget_args(budget: str, method: str) -> list[str]:
    """finetune.py's arguments for a budget (`lora:r=N`, `k=N`, `density=X`, or `default`: finetune.py's own) and
    a method."""
    if budget == "default":  # what a newcomer gets: APET's default budget (K = 10^5), LoRA's --lora-r
        return []
    kind, _, value = budget.partition("=")
    if kind == "density":  # a candidate default: a fraction of the linear weights (APET only)
        if method in ("lora", "full"):
            raise SystemExit(f"budget {budget!r} is for APET schemes; give {method} a lora:r=N or k=N budget")
        try:
            ok = 0 < float(value) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"a density budget is a fraction in (0, 1], got {budget!r}")
        return ["--density", value]
    if kind not in ("lora:r", "k") or not value.isdigit():
        raise SystemExit(f"a budget is lora:r=N, k=N, density=X or default, got {budget!r}")
    if method == "lora":
        return ["--lora-r", value] if kind == "lora:r" else ["--lora-params", value]
    return ["--budget-like", budget] if kind == "lora:r" else ["--num-params", value]


def run_args(args, model: str, task: str, seed: int, budget: str, method: str, lr: float | None = None) -> list[str]:
    argv = ["--data-dir", str(Path(args.data_root) / task), "--model", model, "--seed", str(seed),
            "--epochs", str(setting(args, "epochs", task)), "--max-len", str(setting(args, "max_len", task)),
            "--batch-size", str(args.batch_size)]
    if setting(args, "max_train", task):
        argv += ["--max-train", str(setting(args, "max_train", task))]
    if getattr(args, "holdout", None):  # rates chosen on the training split's last N sentences (PROTOCOL.md)
        argv += ["--holdout", str(args.holdout)]
    if getattr(args, "reserve", None):  # the reported runs of that protocol: never trained on that slice either
        argv += ["--reserve", str(args.reserve)]
    lr = lr if lr is not None else lr_of(args, method)
    if lr:
        argv += ["--lr", str(lr)]
    if method in ("full", "head"):
        return argv + ["--method", method]
    if method == "lora":
        return argv + ["--method", "lora"] + budget_args(budget, method)
    position = method.split("+")[0].split(":")[0]
    argv += ["--method", "apet", "--position", position] + budget_args(budget, method)
    if position == "gradient":
        argv += ["--calibration-batches", str(args.calibration_batches)] + gradient_variant_args(method)
    if method.endswith("+regrow"):
        argv += ["--regrow-interval", str(args.regrow_interval), "--regrow-fraction", str(args.regrow_fraction)]
    return argv


def majority_rate(data_dir: str) -> float:
    """Accuracy of always answering the dev set's most common label (random guessing's bar)."""
    from collections import Counter
    task = finetune.glue.task_for_folder(data_dir)
    labels = finetune.glue.load_local(task, data_dir)["validation"]["labels"]
    return max(Counter(labels).values()) / len(labels)


def scheme_spread(acc_by_scheme: dict[str, list[float]], rounds: int = 2000, seed: int = 0) -> tuple:
    """max - min of the schemes' mean accuracies, and a 95% interval from resampling each scheme's seeds
    with replacement (the metric fixed before the scaling study ran)."""
    import random
    means = [statistics.mean(v) for v in acc_by_scheme.values()]
    point = max(means) - min(means)
    rng = random.Random(seed)
    draws = sorted(max(m) - min(m) for m in ([statistics.mean(rng.choices(v, k=len(v))) for v in acc_by_scheme.values()]
                                             for _ in range(rounds)))
    return point, draws[int(0.025 * rounds)], draws[int(0.975 * rounds) - 1]


def spread_permutation_p(acc_by_scheme_seed: dict[str, dict[int, float]], rounds: int = 10000, seed: int = 0) -> float:
    """p for "no scheme effect" (PROTOCOL.md): the share of within-seed permutations of the scheme labels whose
    spread of scheme means is at least the observed one. Only seeds every scheme ran are used."""
    import random
    seeds = sorted(set.intersection(*(set(v) for v in acc_by_scheme_seed.values())))
    schemes = list(acc_by_scheme_seed)
    table = [[acc_by_scheme_seed[s][k] for s in schemes] for k in seeds]  # one row per seed

    def spread(rows):
        means = [statistics.mean(col) for col in zip(*rows)]
        return max(means) - min(means)

    observed, rng, hits = spread(table), random.Random(seed), 0
    for _ in range(rounds):
        hits += spread([rng.sample(row, len(row)) for row in table]) >= observed - 1e-12
    return (hits + 1) / (rounds + 1)


def smallest_detectable_difference(acc_by_scheme: dict[str, list[float]]) -> float:
    """(z_0.975 + z_0.8) * sqrt(2) * sigma / sqrt(n): the difference of two scheme means that n seeds detect at
    alpha 0.05 with power 0.8, sigma the pooled per-seed standard deviation (PROTOCOL.md)."""
    groups = [v for v in acc_by_scheme.values() if len(v) > 1]
    n = min(len(v) for v in groups)
    pooled = (sum(statistics.variance(v) * (len(v) - 1) for v in groups) / sum(len(v) - 1 for v in groups)) ** 0.5
    return (1.959964 + 0.841621) * 2 ** 0.5 * pooled / n ** 0.5


def summarize(rows: list[dict], majority: dict[str, float]) -> str:
    evaluated = sorted({r.get("evaluated_on", "validation") for r in rows})
    on = "dev" if evaluated == ["validation"] else " and ".join(evaluated)  # (--holdout probes: PROTOCOL.md)
    lines = ["Majority class of each dev set: " + ", ".join(f"{t} {100 * m:.1f}%" for t, m in sorted(majority.items())),
             "", f"| model | task | budget | method | lr | runs | {on} accuracy, mean ± std (%) | trainable | epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    spreads = []
    for model, task in sorted({(r["model"], r["task"]) for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["task"] == task]
        budgets = sorted({r["study_budget"] for r in mine}, key=lambda b: (b == "—", b))
        for budget in budgets:  # "—" (full fine-tuning) last
            best = {}  # per method: the accuracies at its best learning rate (the probe's choice)
            by_seed = {}  # per method: seed -> accuracy at that rate
            present = {r["study_method"] for r in mine if r["study_budget"] == budget}
            for method in [m for m in METHODS if m in present] + sorted(present - set(METHODS)):  # variants last
                for lr in sorted({r["lr"] for r in mine if r["study_method"] == method and r["study_budget"] == budget}):
                    at = [r for r in mine if r["study_method"] == method and r["study_budget"] == budget and r["lr"] == lr]
                    acc = [100 * r["dev_accuracy"] for r in at]
                    if method not in best or statistics.mean(acc) > statistics.mean(best[method]):
                        best[method] = acc
                        by_seed[method] = {r["seed"]: 100 * r["dev_accuracy"] for r in at}
                    sd = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else " (one run)"
                    lines.append(f"| {model} | {task} | {budget} | {method} | {lr:g} | {len(acc)} | "
                                 f"{statistics.mean(acc):.1f}{sd} | {at[0]['trainable']:,d} | {at[0]['epochs']:g} |")
            schemes = {m: a for m, a in best.items() if m in SCHEMES}
            if len(schemes) > 1:
                point, lo, hi = scheme_spread(schemes)
                lora = statistics.mean(best["lora"]) if "lora" in best else None
                relative = f"; / (LoRA - 50) = {point / (lora - 50):.2f}" if lora and lora > 50 else ""
                tests = ""
                if min(len(a) for a in schemes.values()) > 1:
                    p = spread_permutation_p({m: by_seed[m] for m in schemes})
                    tests = (f"; permutation p {p:.2f}; smallest detectable difference at these seeds "
                             f"{smallest_detectable_difference(schemes):.1f} points")
                spreads.append(f"- {model}, {task}, {budget}: spread of {len(schemes)} scheme means (each at its best "
                               f"rate) {point:.1f} points (95% seed bootstrap {lo:.1f}–{hi:.1f}){relative}{tests}")
    return "\n".join(lines + ([""] + spreads if spreads else []))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--tasks", nargs="+", default=["SST-2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", default=["lora:r=2", "lora:r=8"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), type=method_name, metavar="METHOD",
                    help=f"{', '.join(METHODS)}, or gradient variants gradient:OPTION[:OPTION][+regrow] with options "
                         f"signed, snip, xnorm, corr, squared (score), capN / ccapN (row / column cap), warmN (head warm-up steps)")
    ap.add_argument("--models", "--model", nargs="+", default=["minilm"],
                    help="minilm, gemma (the causal LM Gemma 3 270M as a classifier) or model folders: the grid "
                         "runs on each")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--holdout", type=int, default=None,
                    help="evaluate on the last N training sentences, not the dev set (probes that choose rates)")
    ap.add_argument("--reserve", type=int, default=None,
                    help="never train on the last N training sentences, evaluate on the dev set (the reported runs "
                         "of rates chosen with --holdout N)")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--per-task", nargs="+", default=[], metavar="TASK:SETTING=VALUE",
                    help="override epochs, max_len, max_train or budgets (comma-separated) for one task, "
                         "e.g. RTE:epochs=3 RTE:max_len=128 RTE:budgets=lora:r=8")
    ap.add_argument("--lr", type=float, default=None, help="default: finetune.py's per --method default")
    ap.add_argument("--lrs", nargs="+", type=float, default=None,
                    help="an axis of the grid: every method at each of these rates (a probe); overrides --lr")
    ap.add_argument("--lr-by-method", nargs="+", default=[], metavar="METHOD=LR",
                    help="e.g. gradient=1e-3 gradient+regrow=1e-3 (part of a run's identity when resuming)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--regrow-interval", type=int, default=20)
    ap.add_argument("--regrow-fraction", type=float, default=0.3)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "study.jsonl"))
    ap.add_argument("--summarize", action="store_true",
                    help="run nothing: write the summary of every run in --results (all settings) next to it")
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
    plan = [(mo, t, s, b, m, lr) for s in args.seeds for mo in args.models for t in args.tasks for m in args.methods
            for b in (args.budgets_by.get(t, args.budgets) if m not in ("full", "head") else ["—"]) for lr in (args.lrs or [None])]
    current = []
    if args.summarize:
        plan, current = [], done
    for model, task, seed, budget, method, lr in plan:
        name = finetune.glue.task_for_folder(str(Path(args.data_root) / task)).name
        argv_run = run_args(args, model, task, seed, budget, method, lr)
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
    tasks = args.tasks
    if args.summarize:  # the tasks present in the file
        by_name = {finetune.glue.task_for_folder(str(Path(args.data_root) / t)).name: t
                   for t in (p.name for p in Path(args.data_root).iterdir() if p.is_dir())
                   if _is_task(Path(args.data_root) / t)}
        tasks = [by_name[n] for n in sorted({r["task"] for r in done}) if n in by_name]
    majority = {finetune.glue.task_for_folder(str(Path(args.data_root) / t)).name: majority_rate(str(Path(args.data_root) / t))
                for t in tasks}
    table = summarize(current, majority)  # this plan's runs only, not older settings in the same file
    print("\n" + table)
    out.with_suffix(".md").write_text(f"# python/study.py\n\n`{' '.join(sys.argv)}`\n\n{table}\n")


def _is_task(folder: Path) -> bool:
    try:
        finetune.glue.task_for_folder(str(folder))
        return True
    except Exception:  # not a GLUE-format folder of a known task
        return False


if __name__ == "__main__":
    main()
