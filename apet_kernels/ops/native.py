"""The compiled extension (apet_kernels._C, built from csrc/) as a backend of the op set.

The extension registers ``torch.ops.apet_native.*`` with a CPU kernel (at::parallel_for)
and, in CUDA builds, a CUDA kernel for each op. Importing this module fails cleanly when
the extension was not built; dispatch.backends() reports why.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers apet_native::*)

OPS = ("sddmm_", "spmm_", "spmm_t_", "scatter_merge_")


def sddmm(dy, x, indices, row_ptr, out=None) -> torch.Tensor:
    if out is None:
        out = torch.empty(indices.numel(), dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    torch.ops.apet_native.sddmm_(out, dy, x, indices, row_ptr)
    return out


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
