"""The op set registered with the PyTorch dispatcher under the namespace ``apet``.

Each op takes the resolved backend name as its last argument and forwards to that
backend's implementation, so one schema serves every backend and the choice stays
explicit in traces. Fake implementations let ``torch.compile`` and FSDP see shapes
without running kernels; ``apet::sparse_delta_linear`` carries its own autograd
(the SDDMM formula: no dense weight gradient is ever formed).

All tensors are 2-D and token-major: x (T, in), dy (T, out), weight (out, in).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import implementation


def _layout(row_ptr=None, col_ptr=None, col_perm=None) -> dict:
    return {"row_ptr": row_ptr, "col_ptr": col_ptr, "col_perm": col_perm}


def _sddmm_body(dy: Tensor, x: Tensor, indices: Tensor, row_ptr: Optional[Tensor], backend: str) -> Tensor:
    """dv[k] = sum_t dy[t, r_k] x[t, c_k] in fp32."""
    return implementation(backend).sddmm(dy, x, indices, **_layout(row_ptr=row_ptr))


sddmm = torch.library.custom_op("apet::sddmm", mutates_args=())(_sddmm_body)


@sddmm.register_fake
def _(dy, x, indices, row_ptr, backend):
    return dy.new_empty(indices.shape, dtype=torch.promote_types(dy.dtype, torch.float32))


def _spmm__body(out: Tensor, x: Tensor, indices: Tensor, values: Tensor, row_ptr: Optional[Tensor],
          backend: str) -> None:
    """out[:, r] += sum_{k in row r} v_k x[:, c_k]."""
    implementation(backend).spmm_(out, x, indices, values, **_layout(row_ptr=row_ptr))


spmm_ = torch.library.custom_op("apet::spmm_", mutates_args=("out",))(_spmm__body)


@spmm_.register_fake
def _(out, x, indices, values, row_ptr, backend):
    return None


def _spmm_t__body(out: Tensor, dy: Tensor, indices: Tensor, values: Tensor, col_ptr: Optional[Tensor],
            col_perm: Optional[Tensor], backend: str) -> None:
    """out[:, c] += sum_{k in col c} v_k dy[:, r_k]."""
    implementation(backend).spmm_t_(out, dy, indices, values,
                                    **_layout(col_ptr=col_ptr, col_perm=col_perm))


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


def forward_math(impl, x, weight, bias, values, indices, row_ptr, merged: bool) -> Tensor:
    """y = x (W + S)^T + b with backend module ``impl``. ``merged``: W already holds W + S."""
    if merged:
        return F.linear(x, weight, bias)
    fused = getattr(impl, "linear_unmerged", None)
    if fused is not None:
        return fused(x, weight, bias, indices, values, row_ptr=row_ptr)
    y = F.linear(x, weight, bias)
    impl.spmm_(y, x, indices, values, **_layout(row_ptr=row_ptr))
    return y


def backward_math(sddmm_fn, spmm_t_fn, grad, saved, merged: bool, needs_input_grad, has_bias: bool):
    """Gradients (dx, d_weight=None, db, dv) by the SDDMM formula: no out x in tensor is formed.

    ``sddmm_fn(dy, x, indices, row_ptr)`` and ``spmm_t_fn(out, dy, indices, values, col_ptr,
    col_perm)`` are either the registered ops (traced by torch.compile) or a backend's
    functions called directly (eager: no dispatcher round trip).
    """
    x, weight, values, indices, row_ptr, col_ptr, col_perm = saved
    grad = grad.contiguous()
    dx = dv = db = None
    if needs_input_grad[0]:
        dx = grad @ weight  # (T, in): the frozen model's own input-gradient GEMM
        if not merged:
            spmm_t_fn(dx, grad, indices, values, col_ptr, col_perm)
    if needs_input_grad[3]:
        dv = sddmm_fn(grad, x, indices, row_ptr).to(values.dtype)
    if has_bias and needs_input_grad[2]:
        db = grad.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(grad.dtype)
    return dx, None, db, dv


def _sparse_delta_linear_body(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor,
                              indices: Tensor, row_ptr: Optional[Tensor], col_ptr: Optional[Tensor],
                              col_perm: Optional[Tensor], merged: bool, backend: str) -> Tensor:
    """y = x (W + S)^T + b. ``merged``: W already holds W + S, so y is a plain linear."""
    return forward_math(implementation(backend), x, weight, bias, values, indices, row_ptr, merged)


sparse_delta_linear = torch.library.custom_op("apet::sparse_delta_linear", mutates_args=())(_sparse_delta_linear_body)


@sparse_delta_linear.register_fake
def _(x, weight, bias, values, indices, row_ptr, col_ptr, col_perm, merged, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, values, indices, row_ptr, col_ptr, col_perm, merged, backend = inputs
    ctx.merged, ctx.backend = merged, backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, values, indices, row_ptr, col_ptr, col_perm)


def _backward(ctx, grad):
    backend = ctx.backend
    dx, dw, db, dv = backward_math(
        lambda dy, x, idx, rp: torch.ops.apet.sddmm(dy, x, idx, rp, backend),
        lambda out, dy, idx, v, cp, perm: torch.ops.apet.spmm_t_(out, dy, idx, v, cp, perm, backend),
        grad, ctx.saved_tensors, ctx.merged, ctx.needs_input_grad, ctx.has_bias)
    return dx, dw, db, dv, None, None, None, None, None, None


sparse_delta_linear.register_autograd(_backward, setup_context=_setup_context)


class EagerSparseDeltaLinear(torch.autograd.Function):
    """The same math without the dispatcher round trips of a Python custom op.

    Eager steps use this: a registered op costs tens of microseconds of host time per call,
    which showed up as a visible share of small-layer steps on an H100. Under torch.compile
    the registered op above is used instead, so graphs see one opaque op with its autograd.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, row_ptr, col_ptr, col_perm, merged, backend):
        impl = implementation(backend)
        ctx.merged, ctx.impl, ctx.has_bias = merged, impl, bias is not None
        ctx.save_for_backward(x, weight, values, indices, row_ptr, col_ptr, col_perm)
        return forward_math(impl, x, weight, bias, values, indices, row_ptr, merged)

    @staticmethod
    def backward(ctx, grad):
        impl = ctx.impl
        dx, dw, db, dv = backward_math(
            lambda dy, x, idx, rp: impl.sddmm(dy, x, idx, row_ptr=rp),
            lambda out, dy, idx, v, cp, perm: impl.spmm_t_(out, dy, idx, v, col_ptr=cp, col_perm=perm),
            grad, ctx.saved_tensors, ctx.merged, ctx.needs_input_grad, ctx.has_bias)
        return dx, dw, db, dv, None, None, None, None, None, None


# The Python bodies behind each op, by op name (tests re-enter them under a dispatch mode
# to see every tensor an op allocates).
BODIES = {"sddmm": _sddmm_body, "spmm_": _spmm__body, "spmm_t_": _spmm_t__body,
          "scatter_merge_": _scatter_merge__body, "sparse_delta_linear": _sparse_delta_linear_body}
