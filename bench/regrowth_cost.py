"""What a drop-and-regrow step costs on the bench model, against a plain training step.

    python bench/regrowth_cost.py                    # preset `base`, 0.1%, fraction 0.3, 2x256 tokens
    python bench/regrowth_cost.py --model small --density 1e-2

Interleaved rounds in one process: a plain step (forward, backward, AdamW) and a step that ends with a
regrowth (the same, observed, then Regrower.step moving round(0.3 K) deltas per layer). Reports the
median of the per-round ratios and its interquartile range (target: a regrowth step <= 2 plain steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402,F401  (first: keeps libraries' import-time warnings out of the tables)

from apet_kernels import ApetConfig, get_apet_model  # noqa: E402
from apet_kernels.positions import Regrower  # noqa: E402


def main(argv=None) -> None:
    import transformers

    from compare import model_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = transformers.AutoConfig.for_model(**model_config(args.model))
    torch.manual_seed(0)
    model = get_apet_model(transformers.AutoModelForCausalLM.from_config(cfg).eval(),
                           ApetConfig(density=args.density))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # schedule so that every step is due, at (nearly) the full fraction
    regrower = Regrower(model, opt, interval=1, fraction=args.fraction, total_steps=10**9, schedule="linear")

    def plain():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        regrower.steps += 1  # keep the schedule in step without regrowing

    def regrow():
        with regrower.observe():
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        moved = regrower.step()
        opt.zero_grad()
        assert moved > 0

    for fn in (plain, regrow):
        fn()
    ratios, times = [], {"plain": [], "regrow": []}
    for _ in range(args.rounds):
        t = {}
        for name, fn in (("plain", plain), ("regrow", regrow)):
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
            times[name].append(t[name])
        ratios.append(t["regrow"] / t["plain"])
    q = statistics.quantiles(ratios, n=4)
    k = sum(m.delta_values.numel() for m in model.apet_layers().values())
    print(f"model {args.model}, K={k:,d} ({args.density:g}), {args.batch}x{args.seq} tokens, fraction {args.fraction}: "
          f"plain step {1e3 * statistics.median(times['plain']):.0f} ms, step with regrowth "
          f"{1e3 * statistics.median(times['regrow']):.0f} ms, ratio {statistics.median(ratios):.2f} "
          f"(q1 {q[0]:.2f}, q3 {q[2]:.2f}), {len(model.apet_layers())} layers")


if __name__ == "__main__":
    main()
