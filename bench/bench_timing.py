"""Timing and roofline helpers shared by bench/bench_kernels.py, bench/gpu_check.sh and pytest-benchmark.

GPU: triton.testing.do_bench (CUDA events, warm-up, median). CPU: perf_counter median.
Never time on zeros: every input here is random.
"""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 15) -> float:
    """Median wall time of fn() in milliseconds."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def touched(indices: torch.Tensor, in_features: int) -> tuple[int, int]:
    """Distinct rows and columns the deltas touch (what a kernel must read at least once)."""
    idx = indices.long()
    return int(torch.unique(idx // in_features).numel()), int(torch.unique(idx % in_features).numel())


def sddmm_bytes(t: int, indices: torch.Tensor, in_features: int, elt: int) -> int:
    rows, cols = touched(indices, in_features)
    return t * (rows + cols) * elt + indices.numel() * (indices.element_size() + 4)


def spmm_bytes(t: int, indices: torch.Tensor, in_features: int, elt: int) -> int:
    rows, cols = touched(indices, in_features)
    # read the touched source columns once, read and write the touched output columns
    return t * (cols + 2 * rows) * elt + indices.numel() * (indices.element_size() + 4)
