"""A mixed-adapter batch through one layer (inference): batch row i applies adapter ``names[i]``."""

from __future__ import annotations

import torch

from ..errors import ApetStateError
from ..ops.dispatch import implementation


@torch.no_grad()
def forward_mixed(layer, x: torch.Tensor) -> torch.Tensor:
    """Inference with one adapter per batch row (unmerged): the base output, plus for each adapter
    its sparse term on the tokens of its rows only."""
    if not layer._strategy.applies_several:
        raise ApetStateError("a mixed-adapter batch runs unmerged; this layer is merged")
    y = layer.base_layer(x).clone()
    xs = x.to(y.dtype).reshape(-1, layer.in_features)
    y2 = y.view(-1, layer.out_features)
    spmm = implementation(layer._backend_name()).spmm_
    for name, tokens in layer._mixed.token_groups(tuple(x.shape), x.device):
        delta = layer.deltas[name] if name in layer.deltas else None
        if delta is None or delta.k == 0:
            continue
        part = torch.zeros(tokens.numel(), layer.out_features, dtype=y.dtype, device=y.device)
        spmm(part, xs.index_select(0, tokens), delta.indices, delta.values, delta.row_ptr)
        y2.index_add_(0, tokens, part)
    return y
