"""The ahead-of-time compile check: every Triton kernel compiles for the GPU targets on this CPU (issue 31).

The interpreter, which the kernel tests run in, checks semantics only; these compile with Triton's own GPU
backend and ptxas. They run in child processes: the check refuses TRITON_INTERPRET, which conftest sets.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(code_or_args, timeout=600):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    """The launches the dispatcher makes at a benchmark shape (bf16 and fp32), every autotune config."""
    report = tmp_path / "report.md"
    proc = _run(["-m", "apet_kernels.ops.triton.compile_check", "--small", "--arch", "90", "--out", str(report)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    for kernel in ("_sddmm_kernel", "_group_spmm_kernel", "_transpose_kernel"):
        assert f"| {kernel} | sm_90 |" in text, kernel
    assert "FAILED" not in text
    rows = [ln.split("|") for ln in text.splitlines() if ln.startswith("| _")]
    assert len(rows) >= 20 and all(int(r[5]) > 0 for r in rows)  # registers read back from ptxas -v


BROKEN = """
import torch, triton, triton.language as tl
from apet_kernels.ops.triton import compile_check as cc

@triton.jit
def _broken(x, N: tl.constexpr):
    v = tl.load(x + tl.arange(0, N))
    tl.store(x + tl.arange(0, N), tl.dot(v, v))  # tl.dot needs 2-D blocks

launch = cc.Launch(_broken, dict(x=torch.empty(16), N=16), "a broken kernel", dict(num_warps=4))
(result,) = cc.compile_launches([launch], archs=(90,))
print("OK" if result.ok else "FAILED " + result.error)
print(cc.report([result]).splitlines()[0])
"""


def test_a_kernel_that_does_not_compile_is_a_failure_in_the_report(tmp_path):
    script = tmp_path / "broken_kernel.py"  # (@triton.jit reads its source from a file)
    script.write_text(BROKEN)
    proc = _run([str(script)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED CompilationError" in proc.stdout and "0 of 1 variants compiled" in proc.stdout


def test_the_check_refuses_the_interpreter():
    proc = subprocess.run([sys.executable, "-m", "apet_kernels.ops.triton.compile_check", "--small"],
                          env={**ENV, "TRITON_INTERPRET": "1"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
