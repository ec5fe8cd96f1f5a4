"""The GPU compilers' report, made on any machine: every Triton kernel compiled for sm_80 and sm_90 at the benchmark
shapes (apet_kernels.ops.triton.compile_check), and the CUDA kernels of csrc/ through ``nvcc -Xptxas -v``.
Registers, spills, stack and shared memory per kernel and config; exit status 1 when anything fails to compile.

    python bench/compile_report.py --out bench/results/compile                  # both parts
    python bench/compile_report.py --triton-only --out /tmp/r                    # (CI, under a second Triton)

Writes ``triton-<version>.md`` and ``cuda-<nvcc version>.md`` into --out (default bench/runs/compile, ignored).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CU_SOURCES = sorted(ROOT.glob("csrc/*.cu"))
ARCHS = (80, 90)


def triton_report(out: Path, small: bool) -> bool:
    """The Triton part, in a child process: compile_check refuses to run under TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import triton
    path = out / f"triton-{triton.__version__}.md"
    cmd = [sys.executable, "-m", "apet_kernels.ops.triton.compile_check", "--out", str(path)] + (["--small"] * small)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(proc.stdout.strip())
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return proc.returncode == 0


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if home:  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once (else it guesses /usr/local)
        os.environ["CUDA_HOME"] = home
    return str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")


def _includes() -> list[str]:
    """torch's headers, and the `nvidia` wheels' (cusparse.h, cublas_v2.h) the system toolkit may lack, as in
    setup.py's build."""
    from torch.utils.cpp_extension import include_paths
    dirs = list(include_paths(device_type="cuda"))
    for sp in site.getsitepackages():
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return dirs


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")  # (kernel names are Itanium-mangled C++)
    if not filt:
        return {}
    proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines())) if proc.returncode == 0 else {}


def cuda_report(out: Path) -> bool:
    nvcc = _nvcc()
    if not nvcc:
        print("nvcc not found: CUDA kernels not compiled (set CUDA_HOME)", file=sys.stderr)
        return False
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    version = next((ln for ln in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
                    if "release" in ln), "nvcc")
    logs, ok = [], True
    for src in CU_SOURCES:
        for arch in ARCHS:
            cmd = [nvcc, "-c", str(src), "-o", os.devnull, "-O3", "-std=c++20", "-Xptxas", "-v",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC",
                   "-DTORCH_EXTENSION_NAME=_C", *COMMON_NVCC_FLAGS, *(f"-I{d}" for d in _includes())]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            logs.append(proc.stderr)
            if proc.returncode != 0:
                ok = False
                print(f"nvcc failed on {src.name} for sm_{arch}:\n{proc.stderr[-4000:]}", file=sys.stderr)
    from apet_kernels.ops import ptxas_log
    rows = ptxas_log.parse("\n".join(logs))
    names = _demangle([r["kernel"] for r in rows])
    lines = [f"nvcc: {version}; torch {torch.__version__}; `nvcc -Xptxas -v` on {', '.join(s.name for s in CU_SOURCES)}"
             f" for {', '.join(f'sm_{a}' for a in ARCHS)}\n",
             "| kernel | arch | registers | spill st/ld B | stack B | static smem B |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (names.get(r["kernel"], r["kernel"]), r["arch"])):
        name = names.get(r["kernel"], r["kernel"]).replace("(anonymous namespace)::", "").removeprefix("void ")
        name = re.sub(r"\(.*", "", name).replace("|", "\\|")  # the parameter list: the template args say it
        lines.append(f"| `{name}` | {r['arch']} | {r.get('registers')} | {r.get('spill_stores')}/{r.get('spill_loads')}"
                     f" | {r.get('stack')} | {r.get('smem')} |")
    short = re.search(r"release (\d+\.\d+)", version)
    (out / f"cuda-{short.group(1) if short else 'nvcc'}.md").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} CUDA kernel variants compiled" if ok else "CUDA compile FAILED")
    return ok and bool(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "runs" / "compile"))
    ap.add_argument("--triton-only", action="store_true")
    ap.add_argument("--small", action="store_true", help="the Triton part at one shape (quick)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = triton_report(out, args.small)
    if not args.triton_only:
        ok = cuda_report(out) and ok
    print(f"report in {out.resolve()}" + ("" if ok else ": FAILURES (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
