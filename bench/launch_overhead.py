"""Host time per op call, per backend: how long a call takes to *return* (the GPU runs asynchronously).

    python bench/launch_overhead.py --device cuda            # 4096x4096, T=4096, 0.1%, bf16
    python bench/launch_overhead.py --device cpu --dtype float32 --tokens 64

Why: on an H200 (bench/results/h200-2026-11-27) a merged layer step through the Triton backend took
1.25 ms against 0.51 ms through the native one at 4096x4096, while the GPU time of their kernels
differed by ~40 us; the Triton path is bound by host time. This script says which call costs it.
Each call runs after a synchronize, so it starts with an idle queue; the time is the host's only.
On the CPU everything is synchronous, so the numbers there are whole op times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apet_kernels import SparseDeltaLinear, backends  # noqa: E402
from apet_kernels.ops.dispatch import CUDA_AUTO, implementation  # noqa: E402
from apet_kernels.ops.layout import build_layout  # noqa: E402
from apet_kernels.selection import select_indices  # noqa: E402


def host_us(fn, device: torch.device, reps: int, setup=None) -> tuple[float, float, float]:
    """Median (q1, q3) microseconds from call to return, each call on an idle device; ``setup`` runs
    untimed before every call (a backward needs its own forward)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        if setup:
            setup()
        fn()
    sync()
    samples = []
    for _ in range(reps):
        if setup:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    sync()
    q = statistics.quantiles(samples, n=4)
    return statistics.median(samples), q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--interpreted", action="store_true", help="keep Triton on the CPU (TRITON_INTERPRET=1: checks the script, times nothing useful)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out_f, in_f = (int(s) for s in args.shape.split("x"))
    k = max(1, round(args.density * out_f * in_f))
    gen = torch.Generator().manual_seed(0)
    idx = select_indices((out_f, in_f), k, method="random", seed=0).to(device)
    lay = build_layout(idx, (out_f, in_f))
    x = torch.randn(args.tokens, in_f, generator=gen).to(device, dtype)
    dy = torch.randn(args.tokens, out_f, generator=gen).to(device, dtype)
    vals = (torch.randn(k, generator=gen) * 1e-2).to(device)
    w = torch.randn(out_f, in_f, generator=gen).to(device, dtype)
    base = w.reshape(-1)[idx].clone()
    y = torch.empty(args.tokens, out_f, device=device, dtype=dtype)
    dx = torch.empty(args.tokens, in_f, device=device, dtype=dtype)

    names = [n for n, st in backends().items() if st["available"]]
    if device.type == "cuda" and {"triton", "native"} <= set(names):
        names.append(CUDA_AUTO)
    if device.type != "cuda" and "triton" in names and not args.interpreted:
        names.remove("triton")  # the interpreter's time says nothing about launches
    rows = []
    for name in names:
        impl = implementation(name)
        ops = {"sddmm": lambda: impl.sddmm(dy, x, idx, lay.row_ptr),
               "spmm_": lambda: impl.spmm_(y, x, idx, vals, lay.row_ptr),
               "spmm_t_": lambda: impl.spmm_t_(dx, dy, idx, vals, lay.col_ptr, lay.col_perm),
               "scatter_merge_": lambda: impl.scatter_merge_(w, idx, base, vals)}
        if name == "triton":
            ops["transpose"] = lambda: impl.transpose(x)
        for op, fn in ops.items():
            rows.append((name, op, *host_us(fn, device, args.reps)))
        for strategy in ("merged", "unmerged"):
            layer = SparseDeltaLinear(torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype), idx,
                                      strategy=strategy, backend=name if name != CUDA_AUTO else "auto")
            layer.delta_values.data.copy_(vals)
            xg = x.detach().requires_grad_()
            out = {}

            def forward():
                out["y"] = layer(xg)

            def backward():
                out["y"].backward(dy)

            rows.append((name, f"layer forward ({strategy})", *host_us(forward, device, args.reps)))
            rows.append((name, f"layer backward ({strategy})", *host_us(backward, device, args.reps, setup=forward)))
    frozen = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    xf = x.detach().requires_grad_()
    rows.append(("torch", "frozen nn.Linear forward", *host_us(lambda: frozen(xf), device, args.reps)))
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    print(f"host us per call, {args.shape}, T={args.tokens}, K={k}, {args.dtype}, {device.type}{gpu}, "
          f"torch {torch.__version__}\n")
    print("| backend | call | median us | q1 | q3 |\n|---|---|---|---|---|")
    for name, op, med, q1, q3 in rows:
        print(f"| {name} | {op} | {med:.1f} | {q1:.1f} | {q3:.1f} |")


if __name__ == "__main__":
    main()
