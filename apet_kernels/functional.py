"""Functional entry point: y = x (W + S)^T + b with autograd for x, the delta values and the bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_index_content, check_linear_inputs, validate_requested
from .ops.dispatch import resolve
from .ops.layout import DeltaLayout, build_layout
from .ops.library import add_sparse_term


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
    or when ``APET_VALIDATE=1``, so GPU steps never sync on it). ``layout`` (from
    ``build_layout``) saves rebuilding the index orderings at every call.
    """
    check_linear_inputs(x, weight, bias, values, indices)
    if validate_requested(validate, indices):
        check_index_content(indices, weight.numel())
    if layout is None or (not weight_is_merged and layout.col_perm is None):
        layout = build_layout(indices, tuple(weight.shape), columns=not weight_is_merged)
    return add_sparse_term(F.linear(x, weight, bias), x, values.contiguous(), indices.contiguous(), layout,
                           weight_is_merged, resolve(backend, x.device))
