"""What re-quantizing a merged adapter loses: merge_and_unload(requantize=True) against keeping the deltas apart.

    python bench/requantize_error.py                    # small preset, every quantization kind, 5 delta scales
    python bench/requantize_error.py --model tiny --kinds nf4 --scales 1e-3 1e-2

For each quantization kind, a LLaMA preset (random weights, std 0.02 as transformers initializes them) is
loaded quantized, sparse APET (density --density) gets deltas drawn from N(0, scale^2), and the model is
merged with re-quantization. Per scale: the share of tuned positions whose quantized value differs from
the base re-quantized alone, the deltas' projection on what re-quantization kept (1 = all of them), and
the largest per-layer weight error over the deltas' own norm. Trained deltas are of order lr x steps
(Adam moves each about lr per step); APET's deltas in python/results are 1e-3 to 1e-2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_common  # noqa: E402,F401  (first: keeps libraries' import-time warnings out of the tables)


def measure(model_name: str, kind: str, scale: float, density: float) -> dict:
    import torch

    from apet_kernels import ApetConfig, get_apet_model
    from compare import build_model, model_config
    from methods import quantized
    torch.manual_seed(0)
    model = quantized(build_model(dict(config=model_config(model_name))), kind, torch.float32, "cpu")
    apet = get_apet_model(model, ApetConfig(density=density))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in apet.apet_layers().values():
            layer.delta_values.copy_(torch.randn(layer.delta_values.shape, generator=gen) * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apet.merge_and_unload(requantize=True)
    report = apet.requantization_report.values()
    return dict(changed=statistics.mean(r["positions_changed"] for r in report),
                retained=statistics.mean(r["delta_retained"] for r in report),
                error=max(r["error_over_delta"] for r in report))


def main(argv=None):
    from methods import QUANT_KINDS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--kinds", nargs="+", default=list(QUANT_KINDS), choices=list(QUANT_KINDS))
    ap.add_argument("--scales", nargs="+", type=float, default=[1e-4, 1e-3, 3e-3, 1e-2, 1e-1])
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    head = "| base | " + " | ".join(f"δ ~ {s:g}" for s in args.scales) + " |"
    lines = [f"{args.model} preset, density {args.density:g}, weights ~ N(0, 0.02²); each cell: positions changed / "
             f"deltas kept / max error ÷ ‖δ‖", "", head, "|---|" + "---|" * len(args.scales)]
    for kind in args.kinds:
        cells = []
        for scale in args.scales:
            m = measure(args.model, kind, scale, args.density)
            cells.append(f"{100 * m['changed']:.0f}% / {100 * m['retained']:.0f}% / {m['error']:.2g}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# bench/requantize_error.py {' '.join(argv or sys.argv[1:])}\n\n{text}\n")


if __name__ == "__main__":
    main()
