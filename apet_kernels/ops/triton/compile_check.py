"""Compile every Triton kernel ahead of time for a GPU target, on any machine (no GPU needed).

Why: Triton's interpreter (how the CPU tests run the kernels) checks semantics only. Whether a kernel lowers
for sm_90 (``tl.gather`` layouts, shared memory, registers) shows only when Triton's GPU backend compiles it;
the token-major SDDMM (since removed) passed every interpreter test and failed that compile on an H200 (issue 31).

How: the launchers in ``kernels.py`` run on CPU tensors at the benchmark shapes with
every kernel swapped for a recorder, so the launches checked are exactly the dispatcher's (constexprs, grid
arithmetic, chunk tables), with the GPU's SM count in place of the CPU's. Each recorded launch is then
compiled for each target and each of the kernel's autotune configs; the log of the ``ptxas -v`` run Triton
makes for the cubin gives registers and spills, Triton's metadata the shared memory.

    python -m apet_kernels.ops.triton.compile_check --out report.md      # sm_80 and sm_90, bench shapes
    python -m apet_kernels.ops.triton.compile_check --small              # the quick subset the tests run

Exit status 1 when any compile fails. Integer arguments are specialized as Triton does at run time for the
recorded values (1 becomes a constant, multiples of 16 get the divisibility hint); tensors are assumed
16-byte aligned, as CUDA allocations are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
    # the kernels' autotune lists are cut to one small config under the interpreter
    raise SystemExit("compile_check compiles for a GPU: unset TRITON_INTERPRET (the interpreter's autotune lists "
                     "hold one small config, not the ones a GPU tries)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from . import kernels  # noqa: E402
from .. import ptxas_log  # noqa: E402
from ...errors import ApetTypeError
from ..layout import build_layout, stack_slots  # noqa: E402

# (name, SMs): the SM count the grid arithmetic sees for each target (H100 SXM, A100)
TARGETS = {90: 132, 80: 108}
# LLaMA-7B layer shapes (out, in) at T = 4096: bench/bench_kernels.py's defaults
BENCH_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BENCH_TOKENS = 4096
BENCH_DENSITIES = (1e-4, 1e-3, 1e-2)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}


def _jit(kernel):
    """The JITFunction under a kernel, autotuned or not."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel (autotuned or plain) and its arguments by name."""
    kernel: object
    args: dict
    where: str = ""
    options: dict = field(default_factory=dict)  # num_warps / num_stages given at the launch
    kwargs: dict = field(default_factory=dict)   # the launch's keyword arguments (what config pruning reads)

    @property
    def jit(self):
        return _jit(self.kernel)

    @property
    def configs(self) -> list[triton.Config]:
        if isinstance(self.kernel, Autotuner):  # autotuned: every config it may pick for this launch
            prune = self.kernel.early_config_prune
            return list(prune(self.kernel.configs, self.args, **self.kwargs) if prune else self.kernel.configs)
        return [triton.Config({}, num_warps=self.options.get("num_warps", 4), num_stages=self.options.get("num_stages", 3))]


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, sink: list, where: list):
        self.kernel, self.sink, self.where = kernel, sink, where

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            jit = _jit(self.kernel)
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            named = dict(zip(jit.arg_names, args))
            named.update(kwargs)
            self.sink.append(Launch(self.kernel, named, self.where[0], options, dict(kwargs)))
        return launch


@contextlib.contextmanager
def recording(sms: int):
    """Within the block the launchers record their launches (returned list) instead of running kernels."""
    sink: list[Launch] = []
    where = [""]
    names = [(kernels, "_sddmm_kernel"), (kernels, "_group_spmm_kernel"), (kernels, "_transpose_kernel"),
             (kernels, "_slot_spmm_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in names]
    saved += [(kernels, "_num_sms", kernels._num_sms)]
    try:
        for mod, name, kernel in saved[:len(names)]:
            setattr(mod, name, _Recorder(kernel, sink, where))
        kernels._num_sms = lambda device: sms
        yield sink, where
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def bench_launches(sms: int, shapes=BENCH_SHAPES, tokens=BENCH_TOKENS, densities=BENCH_DENSITIES,
                   dtypes=DTYPES) -> list[Launch]:
    """Every launch the Triton backend makes for sddmm, spmm_ and spmm_t_ at these shapes."""
    from ...selection import select_indices
    with recording(sms) as (sink, where), torch.no_grad():
        for out_f, in_f in shapes:
            for density in densities:
                k = max(1, round(density * out_f * in_f))
                idx = select_indices((out_f, in_f), k, seed=0, key="compile_check")
                layout = build_layout(idx, (out_f, in_f))
                values = torch.empty(k, dtype=torch.float32)
                for dtype in dtypes:
                    dy, x = torch.empty(tokens, out_f, dtype=dtype), torch.empty(tokens, in_f, dtype=dtype)
                    tag = f"{out_f}x{in_f} d={density:g} {_TRITON_TYPE[dtype]}"
                    where[0] = f"sddmm {tag}"
                    kernels.sddmm(dy, x, idx, layout.row_ptr)
                    where[0] = f"spmm {tag}"
                    kernels.spmm_(torch.empty(tokens, out_f, dtype=dtype), x, idx, values, layout.row_ptr)
                    where[0] = f"spmm_t {tag}"
                    kernels.spmm_t_(torch.empty(tokens, in_f, dtype=dtype), dy, idx, values, layout.col_ptr,
                                    layout.col_perm)
        # serving (apet_kernels.serving): 4 adapters' slots, LoRA r=16's count each, a decode batch of 256 tokens
        for out_f, in_f in shapes[:1]:
            k = 16 * (out_f + in_f)
            idx = select_indices((out_f, in_f), k, seed=0, key="compile_check")
            table = stack_slots([(idx, torch.zeros(k))] * 4, (out_f, in_f), k, torch.float32)
            for dtype in dtypes:
                where[0] = f"slot_spmm {out_f}x{in_f} 4 slots k={k} {_TRITON_TYPE[dtype]}"
                kernels.slot_spmm_(torch.empty(256, out_f, dtype=dtype), torch.empty(256, in_f, dtype=dtype),
                                   torch.zeros(256, dtype=torch.int64), *table)
    return sink


@dataclass
class Compiled:
    kernel: str
    constexprs: str
    config: str
    arch: int
    where: str
    ok: bool
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    seen_in: list = field(default_factory=list)


def _signature(launch: Launch, config: triton.Config):
    """Triton's (signature, constexprs, attrs) for this launch under ``config``, specialized as at run time."""
    jit = launch.jit
    constexpr_names = {jit.arg_names[p.num] for p in jit.params if p.is_constexpr}
    values = {**launch.args, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jit.arg_names):
        v = values[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPE[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # Triton makes an int argument equal to 1 a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise ApetTypeError(f"{jit.__name__}: argument {name} of type {type(v).__name__} has no Triton type here")
    return signature, constexprs, attrs


def _compile_with_ptxas_log(src: ASTSource, target: GPUTarget, options: dict):
    """triton.compile, and the log of the ptxas run Triton itself made for the cubin (its own flags: Triton 3.8
    adds --regAllocOptLevel=2, 3.6 does not, and registers differ with it). Always compiled, never from the
    cache, so the log is there."""
    knobs = triton.knobs
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=target, options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return ck, buf.getvalue()


def ptxas_usage(log: str) -> dict:
    """Registers, stack and spills of the one kernel in a ``ptxas -v`` log."""
    rows = ptxas_log.parse(log)
    row = rows[0] if rows else {}
    return {k: row.get(k) for k in ("registers", "stack", "spill_stores", "spill_loads")}


def compile_launches(launches: list[Launch], archs=tuple(TARGETS)) -> list[Compiled]:
    """Compile each distinct (kernel, signature, constexprs, config, arch) once; failures are results too."""
    done: dict[tuple, Compiled] = {}
    for launch in launches:
        for config in launch.configs:
            signature, constexprs, attrs = _signature(launch, config)
            for arch in archs:
                key = (launch.jit.__name__, tuple(signature.items()), tuple(constexprs.items()),
                       tuple(sorted(attrs)), config.num_warps, config.num_stages, arch)
                if key in done:
                    done[key].seen_in.append(launch.where)
                    continue
                cfg = f"warps={config.num_warps} stages={config.num_stages}"
                shown = " ".join(f"{k}={v}" for k, v in constexprs.items())
                shown += " " + ",".join(t for n, t in signature.items() if t.startswith("*"))
                result = Compiled(launch.jit.__name__, shown, cfg, arch, launch.where, ok=False, seen_in=[launch.where])
                target = GPUTarget("cuda", arch, 32)
                try:
                    backend = triton.compiler.make_backend(target)
                    options = backend.parse_options(dict(num_warps=config.num_warps, num_stages=config.num_stages))
                    ck, log = _compile_with_ptxas_log(ASTSource(launch.jit, signature, constexprs, attrs), target,
                                                      options.__dict__)
                    result.shared = int(ck.metadata.shared)
                    result.__dict__.update(ptxas_usage(log))
                    result.ok = True
                except Exception as exc:  # noqa: BLE001 - a failed compile is the finding, reported per kernel
                    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                    result.error = f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"
                done[key] = result
    return list(done.values())


def report(results: list[Compiled]) -> str:
    """The markdown table: one row per compiled variant, failures first."""
    head = (f"Triton {triton.__version__}, torch {torch.__version__}: {sum(r.ok for r in results)} of {len(results)} "
            f"variants compiled\n\n| kernel | arch | constexprs, pointer types | config | registers | spill st/ld B | "
            f"stack B | shared B | launches | status |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in sorted(results, key=lambda r: (r.ok, r.kernel, r.arch, r.constexprs, r.config)):
        status = "ok" if r.ok else f"FAILED: {r.error}"
        rows.append(f"| {r.kernel} | sm_{r.arch} | {r.constexprs} | {r.config} | {r.registers} | "
                    f"{r.spill_stores}/{r.spill_loads} | {r.stack} | {r.shared} | {len(r.seen_in)} (e.g. {r.where}) "
                    f"| {status} |")
    return head + "\n" + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--small", action="store_true", help="one shape, one density, bf16 and fp32: the quick subset")
    ap.add_argument("--out", help="write the markdown report here (default: print it)")
    args = ap.parse_args(argv)
    results = []
    for arch in args.arch:
        kw = dict(shapes=[(4096, 4096)], densities=(1e-3,), dtypes=(torch.bfloat16, torch.float32)) if args.small else {}
        results += compile_launches(bench_launches(TARGETS[arch], **kw), archs=(arch,))
    text = report(results)
    if args.out:
        Path(args.out).write_text(text)
        print(text.splitlines()[0])
    else:
        print(text)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.kernel} sm_{r.arch} {r.constexprs} {r.config}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
