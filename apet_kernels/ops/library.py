"""The op set registered with the PyTorch dispatcher (namespace ``apet``) and the sparse term's autograd.

Each op takes the resolved backend name as its last argument and forwards to that backend's
implementation, so one schema serves every backend and the choice stays explicit in traces.
Fake implementations let ``torch.compile`` and FSDP see shapes without running kernels.

The dense part of a linear is never ours: it is the base layer's own call (``F.linear``, a
quantized or sharded layer, another wrapper). ``SparseDeltaTerm`` adds the rest to its output:
- unmerged: y += x S^T (SpMM, in place); backward dx = dy S (SpMM^T), dv = SDDMM(dy, x);
- merged (W already holds W + S): y passes through; backward only dv = SDDMM(dy, x).
No dense weight gradient is ever formed. Eagerly the Function calls a backend's functions
directly (a registered Python op costs tens of microseconds of host time per call); under
``torch.compile`` it calls the registered ops, which the graph keeps opaque.

All tensors are 2-D and token-major: x (T, in), dy (T, out), weight (out, in).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import implementation
from .layout import DeltaLayout


def _sddmm_body(dy: Tensor, x: Tensor, indices: Tensor, row_ptr: Tensor, backend: str) -> Tensor:
    """dv[k] = sum_t dy[t, r_k] x[t, c_k] in fp32."""
    return implementation(backend).sddmm(dy, x, indices, row_ptr)


sddmm = torch.library.custom_op("apet::sddmm", mutates_args=())(_sddmm_body)


@sddmm.register_fake
def _(dy, x, indices, row_ptr, backend):
    return dy.new_empty(indices.shape, dtype=torch.promote_types(dy.dtype, torch.float32))


def _spmm__body(out: Tensor, x: Tensor, indices: Tensor, values: Tensor, row_ptr: Tensor, backend: str) -> None:
    """out[:, r] += sum_{k in row r} v_k x[:, c_k]."""
    implementation(backend).spmm_(out, x, indices, values, row_ptr)


spmm_ = torch.library.custom_op("apet::spmm_", mutates_args=("out",))(_spmm__body)


@spmm_.register_fake
def _(out, x, indices, values, row_ptr, backend):
    return None


def _spmm_t__body(out: Tensor, dy: Tensor, indices: Tensor, values: Tensor, col_ptr: Tensor, col_perm: Tensor,
                  backend: str) -> None:
    """out[:, c] += sum_{k in col c} v_k dy[:, r_k]."""
    implementation(backend).spmm_t_(out, dy, indices, values, col_ptr, col_perm)


spmm_t_ = torch.library.custom_op("apet::spmm_t_", mutates_args=("out",))(_spmm_t__body)


@spmm_t_.register_fake
def _(out, dy, indices, values, col_ptr, col_perm, backend):
    return None


def _scatter_merge__body(weight: Tensor, indices: Tensor, base: Tensor, values: Tensor, backend: str) -> None:
    """weight[p] = cast(base + v): K writes into the frozen weight's own storage."""
    implementation(backend).scatter_merge_(weight, indices, base, values)


scatter_merge_ = torch.library.custom_op("apet::scatter_merge_", mutates_args=("weight",))(_scatter_merge__body)


@scatter_merge_.register_fake
def _(weight, indices, base, values, backend):
    return None


# The Python bodies behind each op, by op name (tests re-enter them under a dispatch mode
# to see every tensor an op allocates).
BODIES = {"sddmm": _sddmm_body, "spmm_": _spmm__body, "spmm_t_": _spmm_t__body,
          "scatter_merge_": _scatter_merge__body}


def _ops(backend: str):
    """(sddmm, spmm_, spmm_t_) for this backend: the registered ops while compiling, else the
    backend's own functions (no dispatcher round trip)."""
    if torch.compiler.is_compiling():
        return (lambda dy, x, idx, rp: torch.ops.apet.sddmm(dy, x, idx, rp, backend),
                lambda out, x, idx, v, rp: torch.ops.apet.spmm_(out, x, idx, v, rp, backend),
                lambda out, dy, idx, v, cp, perm: torch.ops.apet.spmm_t_(out, dy, idx, v, cp, perm, backend))
    impl = implementation(backend)
    return impl.sddmm, impl.spmm_, impl.spmm_t_


def _as_tokens(t: Tensor) -> Tensor:
    """(..., n) -> (tokens, n) without autograd tracking (inside the Function). Not reshape(-1, n):
    ambiguous when a dimension is 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class LinearSparse(torch.autograd.Function):
    """A plain float linear layer run unmerged, as one node (the Python twin of apet_native::linear_sparse):
    y = x W^T + b, then y += x S^T in place; backward dx = dy W, then dx += dy S into the same buffer (no
    zero-filled second dx and no pass adding two), db = sum dy, dv = SDDMM(dy, x). W is frozen: no dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, row_ptr, col_ptr, col_perm, backend: str):
        ctx.backend = backend
        ctx.save_for_backward(x, weight, values, indices, row_ptr, col_ptr, col_perm)
        y = torch.nn.functional.linear(x, weight, bias)
        _, spmm, _ = _ops(backend)
        spmm(_as_tokens(y), _as_tokens(x), indices, values, row_ptr)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, indices, row_ptr, col_ptr, col_perm = ctx.saved_tensors
        sddmm, _, spmm_t = _ops(ctx.backend)
        dy2 = _as_tokens(dy)
        dx = db = dv = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight  # a fresh contiguous buffer: its token view is a view
            spmm_t(_as_tokens(dx), dy2, indices, values, col_ptr, col_perm)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        if ctx.needs_input_grad[3]:
            dv = sddmm(dy2, _as_tokens(x), indices, row_ptr)
            dv = dv if dv.dtype == values.dtype else dv.to(values.dtype)
        return dx, None, db, dv, None, None, None, None, None


def linear_sparse(x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor,
                  layout: DeltaLayout, backend: str) -> Tensor:
    """x (W + S)^T + b for a frozen plain weight, unmerged, as one autograd node (see LinearSparse)."""
    if backend == "native":  # the same node in C++ (csrc/apet_autograd.cpp): no Python in the call or backward
        return torch.ops.apet_native.linear_sparse(x, weight, bias, values, indices, layout.row_ptr, layout.col_ptr,
                                                   layout.col_perm)
    return LinearSparse.apply(x, weight, bias, values, indices, layout.row_ptr, layout.col_ptr, layout.col_perm,
                              backend)


class SparseDeltaTerm(torch.autograd.Function):
    """y (the base layer's output) + the sparse term, with the SDDMM backward (see module docstring).
    y and x keep their leading dimensions: flattening them here, not outside, saves two view nodes
    per layer in the autograd graph (a few microseconds each on small layers)."""

    @staticmethod
    def forward(ctx, y, x, values, indices, row_ptr, col_ptr, col_perm, merged: bool, backend: str):
        ctx.merged, ctx.backend = merged, backend
        ctx.save_for_backward(x, values, indices, row_ptr, col_ptr, col_perm)
        if merged:
            return y.view_as(y)  # W + S is in the base layer's weight: only the backward is ours
        _, spmm, _ = _ops(backend)
        spmm(_as_tokens(y), _as_tokens(x), indices, values, row_ptr)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, indices, row_ptr, col_ptr, col_perm = ctx.saved_tensors
        sddmm, _, spmm_t = _ops(ctx.backend)
        dy2, x2 = _as_tokens(dy), _as_tokens(x)
        dx = dv = None
        if ctx.needs_input_grad[1] and not ctx.merged:
            dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # contiguous: its token view is a view
            spmm_t(_as_tokens(dx), dy2, indices, values, col_ptr, col_perm)
        if ctx.needs_input_grad[2]:
            dv = sddmm(dy2, x2, indices, row_ptr)
            dv = dv if dv.dtype == values.dtype else dv.to(values.dtype)
        return dy, dx, dv, None, None, None, None, None, None


def add_sparse_term(y: Tensor, x: Tensor, values: Tensor, indices: Tensor, layout: DeltaLayout, merged: bool,
                    backend: str) -> Tensor:
    """``y + x S^T`` (unmerged) or ``y`` with the SDDMM attached (merged). y (..., out) and x (..., in)
    share their leading dimensions; ``layout`` holds the row order (and, unmerged, the column order)
    of ``indices``."""
    if backend == "native" and not torch.compiler.is_compiling():
        # the same Function in C++ (csrc/apet_autograd.cpp): no Python in the call or the backward node
        return torch.ops.apet_native.sparse_term(y, x, values, indices, layout.row_ptr, layout.col_ptr,
                                                 layout.col_perm, merged)
    return SparseDeltaTerm.apply(y, x, values, indices, layout.row_ptr, layout.col_ptr, layout.col_perm, merged,
                                 backend)
