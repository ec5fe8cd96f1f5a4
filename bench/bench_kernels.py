"""Kernel microbenchmarks and single-layer steps, side by side in one process.

    python bench/bench_kernels.py --device cuda            # LLaMA-7B layer shapes, T=4096, bf16
    python bench/bench_kernels.py --device cpu --layer-only --shapes 3072x768 --tokens 2048 --dtype float32 \
      --layer-densities 1e-3

Prints a markdown table and writes CSV + markdown to --out (default $OUT, else bench/runs/, git-ignored).
Layer step = forward + backward with x requiring grad (the frozen row computes the same
forward and input gradient, no weight gradient); ratios are to the frozen step.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import DTYPES, environment, torch_dtype, trainable_state_bytes  # noqa: E402
from bench_common import markdown_table as markdown  # noqa: E402
from bench_timing import copy_bandwidth_gbs, median_ms, sddmm_bytes, spmm_bytes  # noqa: E402

import apet_kernels  # noqa: E402
from apet_kernels import DenseMaskLinear, SparseDeltaLinear, select_indices  # noqa: E402
from apet_kernels.ops.layout import build_layout  # noqa: E402



def _shape(s: str) -> tuple[int, int]:
    out_f, in_f = s.lower().split("x")
    return int(out_f), int(in_f)


def kernel_inputs(shape, t, density, dtype, device) -> dict:
    """Random inputs (never zeros) for one layer shape, shared with the pytest-benchmark suite."""
    out_f, in_f = shape
    k = max(1, round(density * out_f * in_f))
    idx = select_indices(shape, k, seed=0, key="bench").to(device)
    return dict(shape=shape, t=t, k=k, idx=idx, layout=build_layout(idx, shape), v=torch.randn(k, device=device),
                x=torch.randn(t, in_f, device=device, dtype=dtype), dy=torch.randn(t, out_f, device=device, dtype=dtype),
                y=torch.randn(t, out_f, device=device, dtype=dtype),
                w=torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5)


def kernel_ops(impl, d) -> dict:
    """op name -> (callable, compulsory bytes) for one backend implementation."""
    (out_f, in_f), t, idx, lay, elt = d["shape"], d["t"], d["idx"], d["layout"], d["x"].element_size()
    ops = {
        "sddmm": (lambda: impl.sddmm(d["dy"], d["x"], idx, lay.row_ptr), sddmm_bytes(t, idx, in_f, elt)),
        "spmm": (lambda: impl.spmm_(d["y"], d["x"], idx, d["v"], lay.row_ptr), spmm_bytes(t, idx, in_f, elt)),
        "spmm_t": (lambda: impl.spmm_t_(d["x"], d["dy"], idx, d["v"], lay.col_ptr, lay.col_perm),
                   spmm_bytes(t, idx, out_f, elt)),
    }
    staged = getattr(impl, "sddmm_staged", None)  # the native backend's second SDDMM (issue 31), side by side
    if staged is not None and d["x"].is_cuda and impl.staged_fits(d["x"]):
        ops["sddmm staged"] = (lambda: staged(d["dy"], d["x"], idx, lay.row_ptr), ops["sddmm"][1])
    return ops


def kernel_rows(shape, t, density, dtype, device, backends, copy_gbs):
    """Each op per backend, and the layer's forward GEMM (x W^T) timed beside them: `pct_gemm` is the
    op's time as a share of one GEMM of the same layer (the CPU target: SDDMM <= 5% at 0.1%)."""
    d = kernel_inputs(shape, t, density, dtype, device)
    gemm_ms = median_ms(lambda: torch.nn.functional.linear(d["x"], d["w"]), device)
    rows = []
    for name in backends:
        impl = apet_kernels.ops.dispatch.implementation(name)
        for op, (fn, nbytes) in kernel_ops(impl, d).items():
            ms = median_ms(fn, device)
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(kind="kernel", op=op, backend=name, shape=f"{shape[0]}x{shape[1]}", tokens=t,
                             density=density, k=d["k"], dtype=str(dtype).replace("torch.", ""), ms=ms,
                             us=ms * 1e3, gbs=gbs, pct_copy=100 * gbs / copy_gbs if copy_gbs else float("nan"),
                             gemm_ms=gemm_ms, pct_gemm=100 * ms / gemm_ms))
    return rows


def _step(module, x, dy, sddmm_walk=None):
    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    if sddmm_walk is None:
        return run
    from apet_kernels.ops import native

    def run_walking():
        with native.chosen(sddmm_walk):
            run()
    return run_walking


def layer_variants(base, k, device, backends):
    """(label, module) for every configuration of one layer."""
    variants = [("frozen", base)]
    first = None
    for backend in backends:
        merged = SparseDeltaLinear.from_linear(copy.deepcopy(base), k=k, strategy="merged", backend=backend)
        unmerged = SparseDeltaLinear.from_linear(copy.deepcopy(base), k=k, strategy="unmerged", backend=backend)
        for m in (merged, unmerged):
            with torch.no_grad():
                m.delta_values.normal_(0, 1e-3)
        first = first or merged
        variants.append((f"sparse merged [{backend}]", merged))
        variants.append((f"sparse unmerged [{backend}]", unmerged))
        if backend == "native" and torch.device(device).type == "cuda" and _staged_fits(base.weight):  # the second SDDMM
            variants.append(("sparse merged [native, sddmm staged]", merged))
    variants.append(("dense-mask", DenseMaskLinear.from_linear(copy.deepcopy(base), first.delta_indices)))
    return variants


def _staged_fits(weight) -> bool:
    from apet_kernels.ops import native
    return native.staged_fits(weight)  # (in_features is the weight's dim 1, as it is x's)


def layer_rows(shape, t, density, dtype, device, backends):
    out_f, in_f = shape
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, bias=False).to(device, dtype)
    base.weight.requires_grad_(False)
    k = max(1, round(density * out_f * in_f))
    x = torch.randn(t, in_f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, out_f, device=device, dtype=dtype)
    rows, times = [], {}
    for label, module in layer_variants(base, k, device, backends):
        walk = "staged" if "sddmm staged" in label else ("warps" if "[native]" in label else None)
        times[label] = median_ms(_step(module, x, dy, walk), device)
        rows.append(dict(kind="layer", op=label, backend=",".join(backends), shape=f"{out_f}x{in_f}", tokens=t,
                         density=density, k=k, dtype=str(dtype).replace("torch.", ""),
                         ms=times[label], us=times[label] * 1e3,
                         trainable_state_bytes_adam=trainable_state_bytes(
                             [p for p in module.parameters() if p.requires_grad], buffers=list(module.buffers()))))
    for r in rows:
        r["ratio_to_frozen"] = r["ms"] / times["frozen"]
    return rows


def profile_steps(shape, t, density, dtype, device, backend) -> str:
    """Kernel-by-kernel GPU time of one merged and one unmerged step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    out_f, in_f = shape
    base = torch.nn.Linear(in_f, out_f, bias=False).to(device, dtype)
    k = max(1, round(density * out_f * in_f))
    x = torch.randn(t, in_f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, out_f, device=device, dtype=dtype)
    report = []
    for strategy in ("merged", "unmerged"):
        layer = SparseDeltaLinear.from_linear(copy.deepcopy(base), k=k, strategy=strategy, backend=backend)
        step = _step(layer, x, dy)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        try:
            table = averages.table(sort_by="device_time_total", row_limit=14, max_name_column_width=60)
        except Exception:  # older torch names the key cuda_time_total
            table = averages.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        report.append(f"## {strategy} step, {out_f}x{in_f}, T={t}, density {density} (5 steps)\n\n{table}")
    return "\n".join(report)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"],
                    help="out x in of the layer (LLaMA-7B: 4096x4096, 11008x4096, 4096x11008)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--densities", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--layer-densities", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--backends", nargs="+", default=None,
                    help="backends for the layer rows (default: every available one but reference on CUDA)")
    ap.add_argument("--kernel-backends", nargs="+", default=None)
    ap.add_argument("--layer-only", action="store_true")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "runs"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table (CUDA)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch_dtype(args.dtype)
    env = environment(str(device))
    print("environment:", env, flush=True)
    print("backends:", apet_kernels.backends(), flush=True)
    rows = []
    copy_gbs = 0.0
    if not args.layer_only:
        copy_gbs = copy_bandwidth_gbs(device)
        print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)", flush=True)
        kb = args.kernel_backends or [n for n, st in apet_kernels.backends().items() if st["available"]
                                      and not (device.type == "cuda" and n == "reference")]
        for shape in args.shapes:
            for density in args.densities:
                new = kernel_rows(_shape(shape), args.tokens, density, dtype, device, kb, copy_gbs)
                rows += new
                print(markdown(new, ["op", "backend", "shape", "density", "k", "us", "gbs", "pct_copy", "pct_gemm"]), flush=True)
    available = [n for n, st in apet_kernels.backends().items() if st["available"]]
    default = [n for n in available if n != "reference"] if device.type == "cuda" else available
    layer_backends = args.backends or default
    if not args.kernels_only:
        for shape in args.shapes:
            for density in args.layer_densities:
                new = layer_rows(_shape(shape), args.tokens, density, dtype, device, layer_backends)
                rows += new
                print(markdown(new, ["op", "shape", "density", "k", "ms", "ratio_to_frozen",
                                     "trainable_state_bytes_adam"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.profile and device.type == "cuda":
        text = profile_steps(_shape(args.shapes[0]), args.tokens, args.layer_densities[0], dtype, device,
                             layer_backends[0])
        print(text, flush=True)
        (out / f"profile_{args.tag or 'run'}.txt").write_text(text)
    stem = f"kernels_{args.device}{('_' + args.tag) if args.tag else ''}"
    keys = sorted({k for r in rows for k in r})
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(out / f"{stem}.md", "w") as f:
        f.write(f"# bench/bench_kernels.py on {env['device']}\n\n{env}\n\ncopy bandwidth {copy_gbs:.0f} GB/s\n\n")
        kr = [r for r in rows if r["kind"] == "kernel"]
        lr = [r for r in rows if r["kind"] == "layer"]
        if kr:
            f.write(markdown(kr, ["op", "backend", "shape", "tokens", "density", "k", "dtype", "us", "gbs",
                                  "pct_copy", "pct_gemm"]) + "\n\n")
        if lr:
            f.write(markdown(lr, ["op", "backend", "shape", "tokens", "density", "k", "dtype", "ms",
                                  "ratio_to_frozen", "trainable_state_bytes_adam"]) + "\n")
    print(f"wrote {out / stem}.csv and .md")


if __name__ == "__main__":
    main()
