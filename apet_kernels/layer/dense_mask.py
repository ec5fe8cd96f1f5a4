"""DenseMaskLinear: the dense-mask APET baseline (W + M * Delta with a full-size delta and mask), for bench/."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_index_content, check_index_meta


class DenseMaskLinear(nn.Module):
    """Dense-mask APET (the baseline): a full-size fp32 delta and a full-size bool mask.

    forward: y = x (W + M * Delta)^T + b, with W + M * Delta rounded to W's dtype (what
    dense-mask APET in bf16 does). Costs about 17 bytes per weight element under Adam,
    whatever K is: this is what SparseDeltaLinear avoids.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, indices: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        check_index_meta(indices, weight.numel())
        check_index_content(indices, weight.numel())
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        mask.view(-1)[indices.long().to(weight.device)] = True
        self.register_buffer("mask", mask)
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor) -> "DenseMaskLinear":
        return cls(linear.weight, linear.bias, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_eff = (self.weight.float() + self.delta * self.mask).to(self.weight.dtype)
        return F.linear(x, w_eff, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, k={int(self.mask.sum())}"
