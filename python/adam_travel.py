"""Why gradient-chosen positions need a lower learning rate than random ones (issue 21, item 2): train a few
steps with each position scheme at one rate and measure what the rate did.

Per scheme, after --steps Trainer steps (the same data, rate and schedule as python/finetune.py):
- travel: mean |delta| / sum of the scheduled rates. AdamW moves a scalar by at most about lr per step, and by
  that much only when its gradient keeps one sign; noisy gradients cancel in Adam's first moment. 1 means every
  tuned scalar moved as far as the schedule allows.
- output change: ||x dWᵀ|| / ||x Wᵀ|| per layer on one batch of training inputs (the inputs captured before
  training), the median over layers: how far the layers' outputs moved.
- column activation: the mean input-feature norm ||x_j|| over the positions' columns, divided by the mean over
  all columns: whether the positions sit on the features with large activations (outlier features).

    python python/adam_travel.py --data-dir ../shared/data/SST-2 --model minilm --budget-like lora:r=8 \\
        --max-train 4000 --max-len 64 --lr 1e-2 --steps 20 --schemes random gradient gradient:ccap1

Results are printed and appended as JSON lines to --results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune  # noqa: E402
import study  # noqa: E402


def capture_inputs(model, layers: dict, batch) -> dict:
    """Each APET layer's input on ``batch`` (the deltas are still zero, so these are the base model's)."""
    seen, hooks = {}, []
    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(
            lambda mod, inputs, out, name=name: seen.__setitem__(name, inputs[0].detach().reshape(-1, inputs[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def measure(args, scheme: str, steps: int) -> dict:
    argv = [*args.common, "--position", scheme.split(":")[0], *study.gradient_variant_args(scheme)]
    run_args = finetune.parse_args(argv)
    setup = finetune.prepare(run_args)
    layers = setup.model.apet_layers()
    batch = next(finetune.batches(setup.train, setup.tokenizer, run_args.batch_size, shuffle_seed=run_args.seed))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    inputs = capture_inputs(setup.model, layers, batch)
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    rates = []  # the run's own schedule (warm-up and decay over all its steps), stopped after `steps`
    trainer = finetune.make_trainer(setup.model, setup.train, setup.tokenizer, run_args, setup.lr, setup.steps,
                                    [_StopAfter(steps, rates)])
    trainer.train()
    assert len(rates) == steps, rates
    travel, change, column = [], [], []
    for name, layer in layers.items():
        values = layer.delta_values.detach().float()
        travel.append(values.abs().mean().item() / sum(rates))
        dw = layer.delta_weight().detach().float()
        x = inputs[name].float()
        change.append((x @ dw.T).norm().item() / (x @ base[name].float().T).norm().item())
        col_norm = x.norm(dim=0)
        cols = layer.delta_indices.long() % dw.shape[1]
        column.append((col_norm[cols].mean() / col_norm.mean()).item())
    return dict(scheme=scheme, lr=setup.lr, steps=steps, of_steps=setup.steps, tuned_scalars=run_args.tuned_scalars,
                travel=statistics.mean(travel), output_change_median=statistics.median(change),
                column_activation=statistics.mean(column), seed=run_args.seed, command=" ".join(argv))


class _StopAfter(TrainerCallback):
    """Logs the rate of each optimizer step (the scheduler's, before it steps) and stops after ``steps``."""

    def __init__(self, steps: int, rates: list):
        self.steps, self.rates = steps, rates

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.rates.append(lr_scheduler.get_last_lr()[0])

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", nargs="+", default=["random", "gradient", "gradient:ccap1"], type=study.method_name)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps to train before measuring")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "adam_travel.jsonl"))
    args, args.common = ap.parse_known_args(argv)  # the rest: finetune.py's arguments (data, model, budget, rate)
    if {"--method", "--position"} & set(args.common):
        raise SystemExit("adam_travel measures APET position schemes: give them with --schemes")
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    for scheme in args.schemes:
        row = measure(args, scheme, args.steps)
        print(f"{scheme}: travel {row['travel']:.3f}, output change {row['output_change_median']:.4f}, "
              f"column activation {row['column_activation']:.2f}", flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
