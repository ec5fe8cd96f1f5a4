"""Host time per layer: what APET adds to a forward (and a forward + backward) of the frozen layer.

    python bench/forward_overhead.py              # tiny layer and the bench model (preset `base`)
    python bench/forward_overhead.py --rounds 400 --model small

Tiny shapes (a 64x64 layer, T = 1 and 4 tokens) so kernel time vanishes and what is left is host
work per layer: frozen nn.Linear, sparse merged, sparse unmerged, PEFT LoRA (rank 1) on the same
layer. Timed in interleaved rounds (one call of each variant per round), reported as the median extra
microseconds over the frozen layer of the same round, with the interquartile range. The model rows
time whole forwards of the bench model, frozen against merged APET (extra microseconds per layer).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402,F401  (first: keeps libraries' import-time warnings out of the tables)

from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def interleaved(variants: dict, rounds: int) -> dict:
    """{name: fn}; the first is the floor. Returns {name: (median extra us, q1, q3)}."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
        fn()
    extra = {n: [] for n in names[1:]}
    floor = []
    for _ in range(rounds):
        t = {n: _time(variants[n]) for n in names}
        floor.append(t[names[0]])
        for n in names[1:]:
            extra[n].append(t[n] - t[names[0]])
    out = {names[0]: (statistics.median(floor), *statistics.quantiles(floor, n=4)[::2])}
    for n, xs in extra.items():
        q = statistics.quantiles(xs, n=4)
        out[n] = (statistics.median(xs), q[0], q[2])
    return out


def tiny_layer(rounds: int, grad: bool, tokens: int, backward: bool = False) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    for p in lin.parameters():
        p.requires_grad_(False)
    variants = {"frozen nn.Linear": lin}
    for strategy in ("merged", "unmerged"):
        layer = SparseDeltaLinear.from_linear(copy.deepcopy(lin), k=40, strategy=strategy)
        with torch.no_grad():
            layer.delta_values.normal_()
        variants[strategy] = layer
    try:
        import peft
        lora = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), peft.LoraConfig(r=1, target_modules=["0"]))
        variants["PEFT LoRA r=1"] = lora.base_model.model[0]
    except ImportError:
        pass
    x = torch.randn(tokens, 64, requires_grad=grad)
    ctx = torch.enable_grad if grad else torch.no_grad

    def run(m):
        def fn():
            with ctx():
                y = m(x)
                if backward:
                    y.sum().backward()
        return fn
    return interleaved({name: run(m) for name, m in variants.items()}, rounds)


def bench_model(preset: str, rounds: int, grad: bool) -> tuple[dict, int]:
    import transformers

    from compare import model_config
    cfg = transformers.AutoConfig.for_model(**model_config(preset))
    torch.manual_seed(0)
    frozen = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    apet = get_apet_model(copy.deepcopy(frozen), ApetConfig(density=1e-3, strategy="merged"))
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    ctx = torch.enable_grad if grad else torch.no_grad

    def run(m):
        def fn():
            with ctx():
                m(input_ids=ids)
        return fn
    return interleaved({"frozen model": run(frozen), "merged APET": run(apet)}, rounds), len(apet.apet_layers())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--model", default="base", help="bench/compare.py preset for the model-level rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| what | median | q1 | q3 |")
    print("| --- | --- | --- | --- |")
    for tokens, grad, backward in ((1, False, False), (1, True, True), (4, False, False), (4, True, False)):
        what = "forward + backward" if backward else ("forward, grad enabled" if grad else "forward, no grad")
        for name, (med, q1, q3) in tiny_layer(args.rounds, grad, tokens, backward).items():
            kind = "us" if name.startswith("frozen") else "extra us"
            print(f"| 64x64 layer, K=40, T={tokens}, {what}: {name} ({kind}) | {med:.1f} | {q1:.1f} | {q3:.1f} |")
    for grad in (False, True):
        rows, n_layers = bench_model(args.model, max(20, args.rounds // 10), grad)
        what = "grad enabled" if grad else "no grad"
        for name, (med, q1, q3) in rows.items():
            if name.startswith("frozen"):
                print(f"| model `{args.model}`, 16 tokens, {what}: {name} (us per forward) | {med:.0f} | {q1:.0f} | "
                      f"{q3:.0f} |")
            else:
                print(f"| model `{args.model}`, {what}: {name}, extra us per layer ({n_layers} layers) | "
                      f"{med / n_layers:.1f} | {q1 / n_layers:.1f} | {q3 / n_layers:.1f} |")


if __name__ == "__main__":
    main()
