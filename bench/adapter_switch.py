"""How long switching between two merged adapters takes: APET's set_adapter against PEFT LoRA's
unmerge_adapter + set_adapter + merge_adapter, on the same LLaMA-style model, in interleaved rounds.

    python bench/adapter_switch.py                          # base preset on CPU (large on a GPU), density 0.1%
    python bench/adapter_switch.py --model large --density 1e-3 --rounds 20

An APET switch restores W at the old adapter's K positions and writes base + v at the new one's K
(per layer: K writes, K gathers, a sort of K indices); a merged LoRA switch subtracts one rank-r
product B A (out x in) from every weight and adds the other's. PEFT's unmerged set_adapter only
flips which adapter the forward applies (shown for reference: it costs nothing at the switch and
the LoRA matmuls at every forward instead). The LoRA rank is matched to APET's K (at least 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_common import environment, markdown_table, torch_dtype  # noqa: E402


def _timed(fn, device) -> float:
    import torch
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def build(args):
    import peft
    import torch

    from apet_kernels import ApetConfig, get_apet_model
    from compare import build_model, model_config
    from methods import _matched_rank
    dtype = torch_dtype(args.dtype)
    spec = dict(config=model_config(args.model))
    torch.manual_seed(0)
    apet = get_apet_model(build_model(spec).to(args.device, dtype), ApetConfig(density=args.density, strategy="merged"))
    apet.add_adapter("b", ApetConfig(density=args.density, seed=1))
    for name in ("b", "default"):  # trained-looking values in both
        apet.set_adapter(name)
        with torch.no_grad():
            for layer in apet.apet_layers().values():
                layer.delta_values.normal_(0, 1e-2)
    k = sum(m.delta_values.numel() for m in apet.apet_layers().values())
    torch.manual_seed(0)
    base = build_model(spec).to(args.device, dtype)
    rank = _matched_rank(base, k)
    targets = sorted({n.split(".")[-1] for n in apet.apet_layers()})
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    lora = peft.get_peft_model(base, config)
    lora.add_adapter("b", config)
    lora.merge_adapter()
    return apet, lora, k, rank


def main(argv=None):
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--model", default="large" if on_gpu else "base")
    ap.add_argument("--device", default="cuda" if on_gpu else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    ap.add_argument("--density", type=float, default=1e-3, help="each APET adapter's share of the target weights")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    apet, lora, k, rank = build(args)
    names = ["default", "b"]
    state = {"apet": "default", "lora": "default"}

    def apet_switch():
        state["apet"] = names[1 - names.index(state["apet"])]
        apet.set_adapter(state["apet"])

    def lora_merged_switch():
        state["lora"] = names[1 - names.index(state["lora"])]
        lora.unmerge_adapter()
        lora.set_adapter(state["lora"])
        lora.merge_adapter()

    def lora_unmerged_switch():
        lora.set_adapter(names[1 - names.index(lora.active_adapter)])

    cases = {"APET set_adapter (merged)": apet_switch, "PEFT LoRA unmerge + set_adapter + merge": lora_merged_switch}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn(), fn()
        times = {name: [] for name in cases}
        ratios = []
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(cases)[::-1]
            got = {name: _timed(cases[name], args.device) for name in order}
            for name, t in got.items():
                times[name].append(t)
            ratios.append(got["PEFT LoRA unmerge + set_adapter + merge"] / got["APET set_adapter (merged)"])
        lora.unmerge_adapter()
        unmerged = [_timed(lora_unmerged_switch, args.device) for _ in range(args.rounds)]
    q = statistics.quantiles(ratios, n=4)
    rows = [dict(switch=name, ms=1e3 * statistics.median(ts)) for name, ts in times.items()]
    rows.append(dict(switch="PEFT LoRA set_adapter, unmerged (forward pays the LoRA matmuls)",
                     ms=1e3 * statistics.median(unmerged)))
    env = environment(args.device)
    title = (f"{args.model} preset, {args.dtype}, {env.get('gpu', env['machine'] + ' CPU')}: APET K = {k:,d} per "
             f"adapter ({args.density:g}), LoRA rank {rank}; medians of {args.rounds} interleaved rounds; LoRA's merged "
             f"switch / APET's: {statistics.median(ratios):.1f}x (q1-q3 {q[0]:.1f}-{q[2]:.1f})")
    table = markdown_table(rows, ["switch", "ms"])
    print(f"{title}\n\n{table}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# python bench/adapter_switch.py {' '.join(argv or sys.argv[1:])}\n\n{env}\n\n"
                                  f"{title}\n\n{table}\n")


if __name__ == "__main__":
    main()
