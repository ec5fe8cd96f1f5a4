"""``python -m apet_kernels``: the environment report to paste into a bug report, then a self-test of
every available backend against the reference (a couple of seconds).

    python -m apet_kernels              # report + self-test; exit status 1 if a check fails
    python -m apet_kernels --no-test    # the report only
    python -m apet_kernels --json       # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from . import __version__
from .ops.dispatch import backends, implementation
from .ops.layout import build_layout

OPTIONAL = ("triton", "transformers", "peft", "safetensors", "accelerate", "bitsandbytes", "torchao")


def installed_version(distribution: str) -> str:
    """Installed version from the package metadata (not imported: some print or take seconds to import)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "absent"


def build_info() -> dict:
    """How the compiled extension was built (written by setup.py), or why there is none."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return {"extension": "no build record (a source checkout not built with pip install -e ., or pure Python)"}
    info = dict(BUILD_INFO)
    built, running = info.get("torch"), torch.__version__
    if built and built.split("+")[0].rsplit(".", 1)[0] != running.split("+")[0].rsplit(".", 1)[0]:
        info["warning"] = f"built against torch {built}, running torch {running}: rebuild (pip install -e . again)"
    return info


def report() -> dict:
    env = {"apet_kernels": f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})",
           "python": f"{platform.python_version()} ({sys.executable})",
           "platform": platform.platform(),
           "torch": torch.__version__, "torch cuda": torch.version.cuda or "none",
           "torch cxx11 abi": torch.compiled_with_cxx11_abi(), "cpu threads": torch.get_num_threads()}
    env.update({name: installed_version(name) for name in OPTIONAL})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = (f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB "
                      f"({torch.cuda.device_count()} device(s))")
    else:
        env["gpu"] = "none (torch.cuda.is_available() is False)"
    env["extension build"] = build_info()
    env["backends"] = backends()
    return env


# ----------------------------------------------------------------------------- self-test
def _check(name, got, want, dtype) -> str | None:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    if not torch.isfinite(got).all():
        return f"{name}: NaN/Inf in the result"
    return None if err <= tol else f"{name}: relative error {err:.3g} > {tol:g}"


def self_test_backend(backend: str, device: str, dtype: torch.dtype) -> list[str]:
    """Each op of ``backend`` on random data (odd shapes, accumulating into random outputs) and a
    layer's forward and backward, against the reference. Returns the failures."""
    ref, impl = implementation("reference"), implementation(backend)
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, t, k = 37, 29, 19, 53

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    idx = torch.sort(torch.randperm(out_f * in_f, generator=gen)[:k]).values.to(torch.int32).to(device)
    layout = build_layout(idx, (out_f, in_f))
    values = torch.randn(k, generator=gen).to(device)
    dy, x = rand(t, out_f), rand(t, in_f)
    failures = []
    failures.append(_check("sddmm", impl.sddmm(dy, x, idx, layout.row_ptr), ref.sddmm(dy, x, idx), dtype))
    y0 = rand(t, out_f)
    got, want = y0.clone(), y0.clone()
    impl.spmm_(got, x, idx, values, layout.row_ptr)
    ref.spmm_(want, x, idx, values, layout.row_ptr)
    failures.append(_check("spmm_", got, want, dtype))
    x0 = rand(t, in_f)
    got, want = x0.clone(), x0.clone()
    impl.spmm_t_(got, dy, idx, values, layout.col_ptr, layout.col_perm)
    ref.spmm_t_(want, dy, idx, values, layout.col_ptr, layout.col_perm)
    failures.append(_check("spmm_t_", got, want, dtype))
    w0, base = rand(out_f, in_f), rand(k)
    got, want = w0.clone(), w0.clone()
    impl.scatter_merge_(got, idx, base, values)
    ref.scatter_merge_(want, idx, base, values)
    failures.append(_check("scatter_merge_", got, want, dtype))

    from .layer import SparseDeltaLinear
    for strategy in ("merged", "unmerged"):
        outs = []
        for b in (backend, "reference"):
            torch.manual_seed(1)
            linear = torch.nn.Linear(in_f, out_f).to(device, dtype)
            layer = SparseDeltaLinear(linear, idx, strategy=strategy, backend=b)
            with torch.no_grad():
                layer.delta_values.copy_(values)
            xx = x.detach().clone().requires_grad_()
            layer(xx).backward(dy)
            outs.append((layer(xx).detach(), xx.grad, layer.delta_values.grad))
        for what, got, want in zip(("forward", "dx", "dv"), outs[0], outs[1]):
            failures.append(_check(f"{strategy} layer {what}", got, want, dtype))
    return [f for f in failures if f]


def self_test() -> tuple[list[dict], bool]:
    rows, ok = [], True
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for backend, status in backends().items():
        for device in devices:
            if not status["available"]:
                rows.append(dict(backend=backend, device=device, result="skipped", detail=status["reason"]))
                continue
            if backend == "triton" and device == "cpu" and torch.cuda.is_available():
                continue  # Triton runs on the GPU here
            if backend == "triton" and device == "cuda" and not torch.cuda.is_available():
                continue
            for dtype in (torch.float32,) + ((torch.bfloat16,) if device == "cuda" else ()):
                start = time.perf_counter()
                try:
                    failures = self_test_backend(backend, device, dtype)
                except Exception as exc:  # a crash is a failure with its reason, not a traceback
                    failures = [f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"]
                ok &= not failures
                rows.append(dict(backend=backend, device=device, dtype=str(dtype).replace("torch.", ""),
                                 result="FAIL" if failures else "ok", seconds=round(time.perf_counter() - start, 2),
                                 detail="; ".join(failures)))
    return rows, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apet_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-test", action="store_true", help="print the environment report only")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    env = report()
    rows, ok = self_test() if not args.no_test else ([], True)
    if args.json:
        print(json.dumps({"environment": env, "self_test": rows, "ok": ok}, indent=1, default=str))
        return 0 if ok else 1
    print("apet-kernels environment (paste this into bug reports)")
    for key, value in env.items():
        if key == "backends":
            print("backends:")
            for name, st in value.items():
                print(f"  {name:10s} {'available' if st['available'] else 'unavailable'}: {st['reason']}")
        elif isinstance(value, dict):
            print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"{key}: {value}")
    if not args.no_test:
        print("self-test against the reference backend:")
        for r in rows:
            where = f"{r['backend']} on {r['device']}" + (f" ({r['dtype']})" if "dtype" in r else "")
            timing = f" in {r['seconds']} s" if "seconds" in r else ""
            print(f"  {where:32s} {r['result']}{timing}" + (f": {r['detail']}" if r["detail"] else ""))
        print("self-test passed" if ok else "SELF-TEST FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
