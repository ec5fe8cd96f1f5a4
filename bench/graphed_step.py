"""One layer's training step eager and compiled with ``torch.compile(mode="reduce-overhead")``, interleaved.

    python bench/graphed_step.py --device cuda          # 3072x768 (GPT-2's MLP), T=2048, 0.1%, bf16 (issue 22)
    python bench/graphed_step.py --device cpu --shape 96x64 --tokens 32 --dtype float32 --rounds 2   # dry run

Why: a small layer's merged step is bound by host time (768 -> 3072 at T=2048 was 2.95x its frozen step eagerly on
an H200, bench/results/h200-2026-11-27); a CUDA graph replays the whole step without the host. A step is what a
trainer runs per layer: forward, backward (x requires grad, as inside a model) and an SGD step of the trainable
parameters. "graphed" says whether Inductor's CUDA graphs ran or were skipped (and why); on the CPU there are
none, so the compiled rows there are plain Inductor code.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import DTYPES, environment, markdown_table, torch_dtype  # noqa: E402
from bench_timing import median_ms  # noqa: E402

from apet_kernels import SparseDeltaLinear, backends  # noqa: E402


def make_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4) if params else None

    def step():
        module(x).backward(dy)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=False)
        x.grad = None
    return step


def variants(shape, density, dtype, device, backend_names):
    out_f, in_f = shape
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, bias=True).to(device, dtype).requires_grad_(False)
    k = max(1, round(density * out_f * in_f))
    out = [("frozen", base)]
    for name in backend_names:
        for strategy in ("merged", "unmerged"):
            layer = SparseDeltaLinear.from_linear(copy.deepcopy(base), k=k, strategy=strategy, backend=name)
            with torch.no_grad():
                layer.delta_values.normal_(0, 1e-3)
            out.append((f"sparse {strategy} [{name}]", layer))
    return out, k


def graph_skips() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"].get("cudagraph_skips", 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--shape", default="3072x768", help="out x in")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--backends", nargs="+", default=None, help="default: every available one but reference")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the table here (markdown)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    out_f, in_f = (int(s) for s in args.shape.lower().split("x"))
    names = args.backends or [n for n, st in backends().items() if st["available"] and n != "reference"]
    x = torch.randn(args.tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, out_f, device=device, dtype=dtype)
    steps, notes = {}, {}
    layers, k = variants((out_f, in_f), args.density, dtype, device, names)
    for label, module in layers:
        steps[(label, "eager")] = make_step(module, x, dy)
        compiled_module = copy.deepcopy(module)
        before = graph_skips()
        try:
            compiled = torch.compile(make_step(compiled_module, x, dy), mode="reduce-overhead")

            def fn(compiled=compiled):
                torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: replays may reuse outputs
                compiled()
            for _ in range(3):  # compile, record, replay
                fn()
            steps[(label, "compiled")] = fn
            notes[label] = ("no (CPU)" if device.type != "cuda" else
                            "skipped (TORCH_LOGS=perf_hints says why)" if graph_skips() > before else "yes")
        except Exception as exc:  # a failure to compile is a result here, reported in the table
            notes[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    samples = {key: [] for key in steps}
    for _ in range(args.rounds):  # interleaved: drift hits every variant alike
        for key, fn in steps.items():
            samples[key].append(median_ms(fn, device))
    frozen = {mode: statistics.median(samples[("frozen", mode)]) for mode in ("eager", "compiled")
              if ("frozen", mode) in samples}
    rows = [dict(layer=label, mode="compiled", graphed=note) for label, note in notes.items()
            if (label, "compiled") not in steps]  # a failed compile is a row too (the H200 run showed none)
    for (label, mode), ms in samples.items():
        med = statistics.median(ms)
        rows.append(dict(layer=label, mode=mode, graphed=notes.get(label, "") if mode == "compiled" else "",
                         ms=med, spread=f"{min(ms):.4g}-{max(ms):.4g}",
                         x_frozen_eager=med / frozen["eager"],
                         x_frozen_same_mode=med / frozen.get(mode, float("nan"))))
    env = environment(str(device))
    table = markdown_table(rows, ["layer", "mode", "graphed", "ms", "spread", "x_frozen_eager",
                                  "x_frozen_same_mode"])
    text = (f"# bench/graphed_step.py on {env['device']}\n\n{env}\n\nlayer {out_f}x{in_f}, T={args.tokens}, "
            f"density {args.density} (k={k}), {args.dtype}, {args.rounds} interleaved rounds\n\n{table}\n")
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
