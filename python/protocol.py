"""PROTOCOL.md's analysis (issue 34), from the committed JSONL only: each method's rate chosen on the held-out
probes, the reported runs at that rate and at the fixed rate side by side, the spread of the scheme means with its
seed-bootstrap interval, permutation p and smallest detectable difference, the floor and ceiling per model, and the
scheme x model-size interaction with its own permutation test.

    python python/protocol.py --probes python/results/protocol_minilm_probe.jsonl \
        --reported python/results/protocol_minilm_report.jsonl --out python/results/protocol_verdict.md

Rates: per model, task, budget and method, the grid point with the best mean held-out accuracy over the probe
seeds (ties: the lower rate). The gradient score is the variant (``gradient``, ``gradient:corr``,
``gradient:xnorm``) whose chosen rate gives the best held-out mean (ties: plain ``gradient`` first); the reported
runs run it as ``gradient``. Reported runs are those evaluated on the dev set.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import scheme_spread, smallest_detectable_difference, spread_permutation_p  # noqa: E402

SCHEMES = ("random", "rows", "magnitude", "gradient")  # PROTOCOL.md's four (the gradient score chosen on probes)
FLOOR, CEILING = "head", "full"
HELD_OUT = "train["  # evaluated_on of a probe (python/finetune.py --holdout)


def load(paths: list[str]) -> list[dict]:
    return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]


def key_of(r: dict) -> tuple:
    return r["model"], r["task"], r["study_budget"]


def choose_rates(probes: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(model, task, budget, method) -> (rate, held-out mean %): the best grid point, ties to the lower rate."""
    acc: dict[tuple, list[float]] = {}
    for r in probes:
        acc.setdefault((*key_of(r), r["study_method"], r["lr"]), []).append(100 * r["dev_accuracy"])
    chosen: dict[tuple, tuple[float, float]] = {}
    for (*key, lr), values in sorted(acc.items(), key=lambda kv: kv[0][-1]):  # lower rates first: they win ties
        mean = statistics.mean(values)
        if tuple(key) not in chosen or mean > chosen[tuple(key)][1] + 1e-9:
            chosen[tuple(key)] = (lr, mean)
    return chosen


def gradient_score(chosen: dict, key: tuple) -> str | None:
    """The gradient variant the probes chose for (model, task, budget): best held-out mean at its chosen rate."""
    variants = sorted((m for (*k, m) in chosen if tuple(k) == key and m.startswith("gradient")),
                      key=lambda m: (m != "gradient", m))
    return max(variants, key=lambda m: chosen[(*key, m)][1] + 1e-9 * (m == "gradient")) if variants else None


def by_seed(reported: list[dict], key: tuple, method: str, lr: float) -> dict[int, float]:
    return {r["seed"]: 100 * r["dev_accuracy"] for r in reported
            if key_of(r) == key and r["study_method"] == method and abs(r["lr"] - lr) < 1e-12}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else " (one run)"
    return f"{statistics.mean(values):.1f}{sd}"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def spread_line(tables: dict[str, dict[int, float]], gap: float | None = None) -> str:
    """The spread of the scheme means, its seed-bootstrap interval, permutation p and smallest detectable
    difference (PROTOCOL.md), and its share of the floor-to-ceiling gap where both ran; or why it cannot be given."""
    if len(tables) < 2 or any(not t for t in tables.values()):
        missing = [m for m, t in tables.items() if not t]
        return f"not yet: no reported runs of {missing}" if missing else "not yet"
    acc = {m: list(t.values()) for m, t in tables.items()}
    point, lo, hi = scheme_spread(acc)
    n = min(len(a) for a in acc.values())
    text = f"spread {point:.1f} points (95% seed bootstrap {lo:.1f}–{hi:.1f}), seeds {n}"
    if n > 1:
        text += (f"; permutation p {_p(spread_permutation_p(tables))}; smallest detectable difference "
                 f"{smallest_detectable_difference(acc):.1f} points")
    if gap:
        text += f"; {100 * point / gap:.0f}% of the {gap:.1f}-point gap from floor to ceiling"
    return text


def _rows(tables: dict[str, dict[int, float]]) -> list[list[float]]:
    """One row per seed that every scheme ran: the schemes' accuracies in SCHEMES order."""
    seeds = sorted(set.intersection(*(set(t) for t in tables.values())))
    return [[tables[m][s] for m in SCHEMES] for s in seeds]


def _spread(rows: list[list[float]]) -> float:
    means = [statistics.mean(col) for col in zip(*rows)]
    return max(means) - min(means)


def interaction(small: dict[str, dict[int, float]], large: dict[str, dict[int, float]], rounds: int = 10000,
                seed: int = 0) -> tuple[float, float, float, float]:
    """The larger model's spread minus the smaller's, a 95% bootstrap interval (seeds resampled within each model),
    and the two-sided permutation p of swapping whole seeds' model labels (a seed's row keeps its schemes together,
    so a model's overall level cancels out of each spread)."""
    a, b = _rows(small), _rows(large)
    observed = _spread(b) - _spread(a)
    rng, pooled, hits, draws = random.Random(seed), a + b, 0, []
    for _ in range(rounds):
        rng.shuffle(pooled)
        hits += abs(_spread(pooled[len(a):]) - _spread(pooled[:len(a)])) >= abs(observed) - 1e-12
        draws.append(_spread(rng.choices(b, k=len(b))) - _spread(rng.choices(a, k=len(a))))
    draws.sort()
    return observed, draws[int(0.025 * rounds)], draws[int(0.975 * rounds) - 1], (hits + 1) / (rounds + 1)


def report(probes: list[dict], reported: list[dict], fixed: float) -> str:
    chosen = choose_rates(probes)
    lines = ["## Rates chosen on the held-out slice", "",
             "(probe runs: how many rows the choice rests on; a grid of 4 rates x 2 probe seeds is 8, fewer is a "
             "choice still being made)", "",
             "| model | task | budget | method | chosen rate | held-out mean (%) | probe runs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    runs = Counter((*key_of(r), r["study_method"]) for r in probes)
    for (model, task, budget, method), (lr, mean) in sorted(chosen.items()):
        lines.append(f"| {model} | {task} | {budget} | {method} | {lr:g} | {mean:.2f} | "
                     f"{runs[model, task, budget, method]} |")
    tables: dict[tuple, dict[str, dict[str, dict[int, float]]]] = {}  # key -> kind -> scheme -> seed -> acc
    keys = sorted({key_of(r) for r in reported if r["study_budget"] != "—"})
    for key in keys:
        score = gradient_score(chosen, key)
        lines += ["", f"## {key[0]}, {key[1]}, {key[2]}", "",
                  f"Gradient score chosen on the probes: `{score}` (its reported runs are the gradient row)." if score else
                  "No gradient probes for this budget.", "",
                  f"| scheme | chosen rate | seeds | dev accuracy (%) | fixed rate {fixed:g}: seeds | dev accuracy (%) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        kinds = {"held-out choice": {}, f"fixed rate {fixed:g}": {}}
        for method in SCHEMES:
            probe_method = score if method == "gradient" and score else method
            lr = chosen.get((*key, probe_method), (None,))[0]
            at_choice = by_seed(reported, key, probe_method, lr) if lr is not None else {}
            at_fixed = by_seed(reported, key, probe_method, fixed)
            kinds["held-out choice"][method], kinds[f"fixed rate {fixed:g}"][method] = at_choice, at_fixed
            lines.append(f"| {probe_method} | {'—' if lr is None else f'{lr:g}'} | {len(at_choice)} | "
                         f"{_mean_sd(list(at_choice.values()))} | {len(at_fixed)} | {_mean_sd(list(at_fixed.values()))} |")
        bounds = {}
        for ref in (FLOOR, CEILING):
            lr = chosen.get((key[0], key[1], "—", ref), (None,))[0]
            runs = by_seed(reported, (key[0], key[1], "—"), ref, lr) if lr is not None else {}
            name = "floor: head only" if ref == FLOOR else "ceiling: full fine-tuning"
            lines.append(f"| {name} | {'—' if lr is None else f'{lr:g}'} | {len(runs)} | "
                         f"{_mean_sd(list(runs.values()))} | | |")
            bounds[ref] = statistics.mean(runs.values()) if runs else None
        gap = bounds[CEILING] - bounds[FLOOR] if None not in bounds.values() else None
        lines.append("")
        for kind, t in kinds.items():
            lines.append(f"- at the {kind}: {spread_line(t, gap)}")
        tables[key] = kinds
    models = sorted({k[0] for k in tables}, key=lambda m: (m != "minilm", m))  # the smaller model first
    pairs = [((models[0], *k[1:]), (m, *k[1:])) for m in models[1:] for k in tables if k[0] == models[0]
             and (m, *k[1:]) in tables]
    if pairs:
        lines += ["", "## Scheme x model size (the larger model's spread minus the smaller's)", ""]
    for small, large in pairs:
        for kind in tables[small]:
            a, b = tables[small][kind], tables[large][kind]
            if any(len(t) < 2 for t in (*a.values(), *b.values())):
                lines.append(f"- {large[0]} − {small[0]}, {small[1]}, {small[2]}, {kind}: not yet (seeds missing)")
                continue
            diff, lo, hi, p = interaction(a, b)
            lines.append(f"- {large[0]} − {small[0]}, {small[1]}, {small[2]}, {kind}: {diff:+.1f} points (95% "
                         f"bootstrap {lo:+.1f} to {hi:+.1f}), permutation p {_p(p)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", nargs="+", required=True, help="JSONL of the held-out rate probes")
    ap.add_argument("--reported", nargs="+", required=True, help="JSONL of the reported runs (dev set)")
    ap.add_argument("--fixed-lr", type=float, default=1e-2, help="the rate fixed in advance (PROTOCOL.md: 1e-2)")
    ap.add_argument("--out", default=None, help="also write the report here (markdown)")
    args = ap.parse_args(argv)
    probes = [r for r in load(args.probes) if str(r.get("evaluated_on", "")).startswith(HELD_OUT)]
    reported = [r for r in load(args.reported) if r.get("evaluated_on", "validation") == "validation"]
    if not probes or not reported:
        raise SystemExit(f"need held-out probes ({len(probes)} found) and dev-set runs ({len(reported)} found)")
    text = report(probes, reported, args.fixed_lr)
    print(text)
    if args.out:
        command = " ".join(["python", "python/protocol.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.out).write_text(f"# PROTOCOL.md's analysis\n\n`{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
