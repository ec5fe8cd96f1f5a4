"""The compiled extension (apet_kernels._C, built from csrc/) as a backend of the op set.

The extension registers ``torch.ops.apet_native.*`` with a CPU kernel (at::parallel_for)
and, in CUDA builds, a CUDA kernel for each op. Importing this module fails cleanly when
the extension was not built; dispatch.backends() reports why.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers apet_native::*)
from .layout import build_layout

OPS = ("sddmm_", "spmm_", "spmm_t_", "scatter_merge_")


def _layout(indices, shape, row_ptr=None, col_ptr=None, col_perm=None):
    if row_ptr is None or col_ptr is None or col_perm is None:
        built = build_layout(indices, shape)
        return (built.row_ptr if row_ptr is None else row_ptr,
                built.col_ptr if col_ptr is None else col_ptr,
                built.col_perm if col_perm is None else col_perm)
    return row_ptr, col_ptr, col_perm


def sddmm(dy, x, indices, out=None, row_ptr=None, **layout) -> torch.Tensor:
    if out is None:
        out = torch.empty(indices.numel(), dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    if row_ptr is None:
        row_ptr, _, _ = _layout(indices, (dy.shape[1], x.shape[1]))
    torch.ops.apet_native.sddmm_(out, dy, x, indices, row_ptr)
    return out


def spmm_(out, x, indices, values, row_ptr=None, **layout) -> None:
    if row_ptr is None:
        row_ptr, _, _ = _layout(indices, (out.shape[1], x.shape[1]))
    torch.ops.apet_native.spmm_(out, x, indices, values, row_ptr)


def spmm_t_(out, dy, indices, values, col_ptr=None, col_perm=None, **layout) -> None:
    if col_ptr is None or col_perm is None:
        _, col_ptr, col_perm = _layout(indices, (dy.shape[1], out.shape[1]))
    torch.ops.apet_native.spmm_t_(out, dy, indices, values, col_ptr, col_perm)


def scatter_merge_(weight, indices, base, values) -> None:
    torch.ops.apet_native.scatter_merge_(weight, indices, base, values)


def fingerprint(t: torch.Tensor) -> int:
    """64-bit hash of a contiguous CPU tensor's bytes (dtype and length included)."""
    return torch.ops.apet_native.fingerprint(t)


# Shapes for torch.compile / FakeTensor: every native op mutates its first argument only.
for _name in OPS:
    torch.library.register_fake(f"apet_native::{_name}")(lambda *args, **kwargs: None)
