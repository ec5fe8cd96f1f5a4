"""The compiled extension (apet_kernels._C, built from csrc/) as a backend of the op set.

The extension registers ``torch.ops.apet_native.*`` with a CPU kernel (at::parallel_for)
and, in CUDA builds, a CUDA kernel for each op. Importing this module fails cleanly when
the extension was not built; dispatch.backends() reports why.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .. import _C  # noqa: F401  (loads the library: registers apet_native::*)
from ..errors import ApetValueError

OPS = ("sddmm_", "spmm_", "spmm_t_", "scatter_merge_", "sddmm_staged_")
SDDMM_WALKS = ("warps", "staged")
_CHOICE: list[str | None] = [None]  # set by `chosen` (benchmarks); None: APET_NATIVE_SDDMM decides


def sddmm(dy, x, indices, row_ptr, out=None) -> torch.Tensor:
    if out is None:
        out = torch.empty(indices.numel(), dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    if dy.is_cuda and _walk() == "staged" and staged_fits(x):
        torch.ops.apet_native.sddmm_staged_(out, dy, x, indices, row_ptr)
    else:
        torch.ops.apet_native.sddmm_(out, dy, x, indices, row_ptr)
    return out


def sddmm_staged(dy, x, indices, row_ptr, out=None, *, smem_budget: int = 0, sms: int = 0,
                 threads: int = 0) -> torch.Tensor:
    """The staged SDDMM (csrc/sddmm_staged.h): the CUDA kernel on CUDA tensors; on CPU tensors its emulation,
    the same per-thread code run block by block (a test oracle, not a CPU kernel). ``smem_budget`` (bytes per
    block), ``sms`` and ``threads`` stand in for the device's where given (the emulation's tests shrink them to
    reach many bands, passes and token groups at small shapes)."""
    if out is None:
        out = torch.empty(indices.numel(), dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    torch.ops.apet_native.sddmm_staged_(out, dy, x, indices, row_ptr, smem_budget, sms, threads)
    return out


def _walk() -> str:
    return _CHOICE[0] or os.environ.get("APET_NATIVE_SDDMM", "warps")


def staged_fits(x: torch.Tensor) -> bool:
    """Whether x's rows fit the device's shared memory (16 bytes per feature, and one row of dy)."""
    return (x.shape[1] + 1) * 16 <= _smem_optin(x.device.index if x.device.index is not None
                                                else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0))


@contextlib.contextmanager
def chosen(walk: str):
    """Within the block the native CUDA SDDMM walks ``"staged"`` or ``"warps"`` (one warp per delta, the
    default until a GPU measures both) whatever ``APET_NATIVE_SDDMM`` says."""
    if walk not in SDDMM_WALKS:
        raise ApetValueError(f"the native SDDMM walks {' or '.join(map(repr, SDDMM_WALKS))}, not {walk!r}")
    before, _CHOICE[0] = _CHOICE[0], walk
    try:
        yield
    finally:
        _CHOICE[0] = before


def spmm_(out, x, indices, values, row_ptr) -> None:
    torch.ops.apet_native.spmm_(out, x, indices, values, row_ptr)


def spmm_t_(out, dy, indices, values, col_ptr, col_perm) -> None:
    torch.ops.apet_native.spmm_t_(out, dy, indices, values, col_ptr, col_perm)


def scatter_merge_(weight, indices, base, values) -> None:
    torch.ops.apet_native.scatter_merge_(weight, indices, base, values)


def fingerprint(t: torch.Tensor) -> int:
    """64-bit hash of a contiguous CPU tensor's bytes (dtype and length included)."""
    return torch.ops.apet_native.fingerprint(t)


# Shapes for torch.compile / FakeTensor: every native op mutates its first argument only.
for _name in OPS:
    torch.library.register_fake(f"apet_native::{_name}")(lambda *args, **kwargs: None)
