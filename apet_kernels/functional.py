"""Functional entry point: y = x (W + S)^T + b with autograd for x, the delta values and the bias."""

from __future__ import annotations

import math

import torch

from ._checks import check_index_content, check_linear_inputs, validate_requested
from .ops import library
from .ops.dispatch import resolve
from .ops.layout import DeltaLayout


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        values: torch.Tensor, indices: torch.Tensor, *, backend: str = "auto",
                        weight_is_merged: bool = False, layout: DeltaLayout | None = None,
                        validate: bool | None = None) -> torch.Tensor:
    """``x @ (weight + S).T + bias`` where S holds ``values`` at flat row-major ``indices``.

    x may have any leading dimensions; x and weight share one floating dtype; values are
    usually fp32 and are accumulated in fp32. Gradients flow to x, values and (if it
    requires grad) bias, never to weight, and the backward never allocates an
    out x in tensor. ``weight_is_merged=True`` says weight already holds W + S (the merged
    strategy); the forward is then a plain linear and only the SDDMM is extra.
    ``validate`` reads the indices to check range/order (default: only for CPU tensors
    or when ``APET_VALIDATE=1``, so GPU steps never sync on it).
    """
    check_linear_inputs(x, weight, bias, values, indices)
    if validate_requested(validate, indices):
        check_index_content(indices, weight.numel())
    return apply_sparse_delta_linear(x, weight, bias, values, indices, resolve(backend, x.device),
                                     weight_is_merged, layout)


def apply_sparse_delta_linear(x, weight, bias, values, indices, backend_name: str, weight_is_merged: bool,
                              layout: DeltaLayout | None) -> torch.Tensor:
    """The op itself, for callers whose inputs are already checked (SparseDeltaLinear checks its
    buffers when it is built or loaded, not at every forward). ``backend_name`` is resolved."""
    out_features, in_features = weight.shape
    # kernels walk indices and values as dense arrays (K elements: a copy only for strided views)
    indices, values = indices.contiguous(), values.contiguous()
    row_ptr, col_ptr, col_perm = layout if layout is not None else (None, None, None)
    tokens = math.prod(x.shape[:-1])  # not reshape(-1, in): ambiguous when a dimension is 0
    args = (x.reshape(tokens, in_features), weight, bias, values, indices, row_ptr, col_ptr, col_perm,
            weight_is_merged, backend_name)
    if torch.compiler.is_compiling():
        y = torch.ops.apet.sparse_delta_linear(*args)
    else:
        y = library.EagerSparseDeltaLinear.apply(*args)
    return y.reshape(*x.shape[:-1], out_features)
