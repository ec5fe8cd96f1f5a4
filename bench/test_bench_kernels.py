"""Kernel microbenchmarks with pytest-benchmark: `pytest bench/ --benchmark-only`.

Same inputs and op callables as bench/bench_kernels.py (kernel_inputs, kernel_ops). Sizes are small
enough for the CPU; on a GPU, set APET_BENCH_SHAPE=4096x4096 APET_BENCH_TOKENS=4096.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import apet_kernels  # noqa: E402
from apet_kernels.ops.dispatch import implementation  # noqa: E402
from bench_kernels import kernel_inputs, kernel_ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = tuple(int(s) for s in os.environ.get("APET_BENCH_SHAPE", "3072x768").split("x"))
TOKENS = int(os.environ.get("APET_BENCH_TOKENS", "2048"))
# the Triton interpreter is not worth timing on a CPU
BACKENDS = [b for b, st in apet_kernels.backends().items() if st["available"]
            and not (b == "triton" and DEVICE.type == "cpu")]


@pytest.fixture(scope="module")
def data():
    return kernel_inputs(SHAPE, TOKENS, 1e-3, torch.float32 if DEVICE.type == "cpu" else torch.bfloat16, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sddmm", "spmm", "spmm_t"])
def test_kernel(benchmark, data, backend, op):
    fn, nbytes = kernel_ops(implementation(backend), data)[op]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    benchmark.extra_info.update(bytes=nbytes, shape=SHAPE, tokens=TOKENS, k=data["k"])
    benchmark(run)
