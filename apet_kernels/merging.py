"""Merging over quantized bases: dequantize, add the deltas in fp32, and keep the result as a float layer or
quantize it again like the base, measuring what re-quantization does to the deltas."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layer import SparseDeltaLinear
from .quantized import dequantize, float_dtype, quantize_like


def activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a quantized model computes in: that of its first float parameter (embeddings, norms)
    that is not a quantized weight. A merged float layer takes it, so it accepts the inputs it gets."""
    quantized = {id(m.base_layer.weight) for m in model.modules()
                 if isinstance(m, SparseDeltaLinear) and m.quantization is not None}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized), None)


@torch.no_grad()
def merge_quantized(layer: SparseDeltaLinear, requantize: bool, config=None,
                    dtype: torch.dtype | None = None) -> tuple[nn.Module, dict | None]:
    """A quantized layer's merged replacement: dequantized W + S (added in fp32) as a float nn.Linear in
    ``dtype`` (default: the layer's own), or quantized again like the base, with a report: the largest
    error against W + S kept apart, that error's norm over the deltas' norm, and the part of the deltas
    that survives (their projection on what re-quantizing W + S changed relative to re-quantizing W)."""
    base = layer.base_layer
    dense = dequantize(base).float()
    merged = dense.clone()
    idx = layer.delta_indices.long().to(merged.device)
    merged.view(-1)[idx] += layer.delta_values.detach().float().to(merged.device)
    dtype = dtype or float_dtype(base)
    if not requantize:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                           device=merged.device, dtype=dtype)
        linear.weight.copy_(merged)
        if base.bias is not None:
            linear.bias.copy_(base.bias.detach())
        return linear.requires_grad_(False), None
    new = quantize_like(base, merged, config)
    got = dequantize(new).float()
    # re-quantizing a dequantized weight is not the identity (block scales are recomputed): what the
    # deltas did through quantization is measured against re-quantizing the base alone
    floor = dequantize(quantize_like(base, dense, config)).float().view(-1)[idx]
    delta = layer.delta_values.detach().float().to(merged.device)
    delta_sq = max(float(delta.pow(2).sum()), 1e-30)
    report = {"max_abs_error": float((got - merged).abs().max()),
              "error_over_delta": float((got - merged).norm()) / delta_sq ** 0.5,
              "delta_retained": float(((got.view(-1)[idx] - floor) * delta).sum()) / delta_sq,
              "positions_changed": float((got.view(-1)[idx] != floor).float().mean())}
    return new, report


def requantization_summary(report: dict[str, dict]) -> str:
    if not report:
        return "requantize: no quantized layer"
    worst = max(report, key=lambda n: report[n]["error_over_delta"])
    changed = [r["positions_changed"] for r in report.values()]
    return (f"re-quantizing {len(report)} merged layers: on average {100 * sum(changed) / len(changed):.0f}% of the "
            f"tuned positions hold a different quantized value than the base re-quantized alone (min "
            f"{100 * min(changed):.0f}%); the weight error against W + S kept apart is up to "
            f"{report[worst]['error_over_delta']:.2f}x the deltas' own norm ({worst}). Keep the adapter unmerged "
            f"(or merge to a float model) to apply the deltas exactly; per-layer numbers: requantization_report")
