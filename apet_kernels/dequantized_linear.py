"""The ``dequantized`` strategy: over a quantized base, S is scattered into the weight dequantized for each GEMM.

A quantization library's training path (bitsandbytes 4-bit's dx, its CPU forward, bitsandbytes int8 on CPU,
torchao's fallbacks) dequantizes W to a float temporary for a dense GEMM. Scattering cast(W[p] + v) into that
temporary (K writes) makes the forward and dx one dense GEMM each, as merged layers are over a float W, instead
of the base call plus an SpMM forward and an SpMM^T backward. The quantized storage is never written; the
temporary lives for one GEMM (the backward dequantizes again, as bitsandbytes does) and dv comes from the
SDDMM that the merged sparse term attaches (apet_kernels.ops.library.add_sparse_term).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantized import dequantize_for_gemm, gemm_dtype


def _weight_with_deltas(base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """dequantize(W) + S in ``dtype``: W[p] = cast(W[p] + v), rounded once as a merged float weight is."""
    w = dequantize_for_gemm(base_layer, dtype)
    flat, idx = w.view(-1), indices.long()
    flat.index_copy_(0, idx, (flat.index_select(0, idx).to(values.dtype) + values).to(dtype))
    return w


class DequantizedLinear(torch.autograd.Function):
    """y = x (dequantize(W) + S)^T + b for x and the bias; ``values`` is read, not differentiated (dv is the
    SDDMM's). Returns y in x's dtype (autocast: the GEMM's), as the quantized layers do."""

    @staticmethod
    def forward(ctx, x, bias, values, indices, base_layer):
        dtype = gemm_dtype(base_layer, x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            w = _weight_with_deltas(base_layer, indices, values.detach(), dtype)
            y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
        ctx.base_layer, ctx.dtype, ctx.x_dtype = base_layer, dtype, x.dtype
        ctx.save_for_backward(values, indices)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        if ctx.needs_input_grad[0]:
            values, indices = ctx.saved_tensors
            w = _weight_with_deltas(ctx.base_layer, indices, values.detach(), ctx.dtype)
            dx = (dy.to(ctx.dtype) @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, db, None, None, None
