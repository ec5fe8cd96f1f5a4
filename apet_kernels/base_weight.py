"""W, a SparseDeltaLinear's frozen weight, at tuned positions: the only code that reads W there (each adapter's
``base``: W's own values at its positions) or writes single positions of it, for every strategy. Only the merged
strategy keeps W + S in W between calls (apet_kernels.merged_weight, its private state, writes through this).

Under FSDP2, between steps, reads gather the sharded weight (a collective) and writes go to each rank's own block.
Under DeepSpeed ZeRO-3, reads between gathers gather the weight (a collective) and writes happen only while it is
gathered (a forward or a backward): its partitions are never written, so they always hold the pure weight.
"""

from __future__ import annotations

import torch

from .errors import ApetStateError
from .linear_like import stored_weight
from .quantized import values_at
from .sharded import is_dtensor, local_block
from .zero3 import gathered, is_gathered, is_partitioned


def _sharded(w: torch.Tensor):
    """For a DTensor (FSDP2's sharded parameter, between steps): its local tensor and the block [r0, r1) x [c0, c1)
    of the whole stored tensor it holds; None for a plain tensor."""
    if not is_dtensor(w):
        return None
    local, offset, shape = local_block(w)
    return local, offset[0], offset[0] + shape[0], offset[1], offset[1] + shape[1]


class BaseWeight:
    """W of one SparseDeltaLinear (``layer``) at positions; ``stale``: the active adapter's base not read yet (a
    meta-device weight, or positions that just moved)."""

    def __init__(self, layer):
        self.layer = layer
        self.stale = True

    def stored(self, write: bool) -> torch.Tensor:
        w = stored_weight(self.layer.base_layer)
        if write and not isinstance(w, torch.nn.Parameter):
            raise ApetStateError("this layer's weight is now computed from several tensors (a parametrization such as "
                                 "weight_norm added after merging): W + S cannot be written or restored there; remove "
                                 "the parametrization (parametrize.remove_parametrizations) first")
        return w

    def storage(self, write: bool = False) -> torch.Tensor:
        """W's data as (out, in) (a view for GPT-2's Conv1D): writes here never touch autograd. Where the weight
        came to be computed from another Parameter after patching (pruned, parametrized), that Parameter."""
        w = self.stored(write).data
        return w.t() if self.layer.weight_transposed else w

    def _rows_cols(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.long()
        in_features = self.layer.in_features
        return idx // in_features, idx % in_features

    def _local(self, w: torch.Tensor, indices: torch.Tensor):
        """A sharded weight's local tensor, as (out, in), the local (row, col) of the positions it holds and which
        of ``indices`` those are."""
        local, s0, s1, t0, t1 = _sharded(w)
        r, c = self._rows_cols(indices.to(local.device))
        if self.layer.weight_transposed:  # GPT-2's Conv1D stores (in, out): its blocks are of columns then rows
            inside = (c >= s0) & (c < s1) & (r >= t0) & (r < t1)
            return local.t(), r[inside] - t0, c[inside] - s0, inside
        inside = (r >= s0) & (r < s1) & (c >= t0) & (c < t1)
        return local, r[inside] - s0, c[inside] - t0, inside

    @torch.no_grad()
    def put(self, indices: torch.Tensor, content: torch.Tensor) -> None:
        """W[indices] = content (one value per position, cast to W's dtype), into a plain weight or into the
        local block of a sharded one (each rank writes the positions it holds)."""
        w = self.stored(write=True)
        if is_partitioned(w) and not is_gathered(w):
            return  # (ZeRO-3 between gathers: the partitions hold the pure weight, and the next gather brings it)
        if _sharded(w) is None:
            storage = self.storage(write=True)
            storage.index_put_(self._rows_cols(indices.to(storage.device)), content.to(storage.device, storage.dtype))
            return
        local, r, c, inside = self._local(w, indices)
        local.index_put_((r, c), content.to(local.device)[inside].to(local.dtype))

    @torch.no_grad()
    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """W at the positions; a sharded weight is gathered by every rank together (a collective, one layer at a
        time: a switch of adapters or a regrowth under FSDP2 runs on every rank anyway)."""
        w = self.stored(write=False)
        if is_partitioned(w) and not is_gathered(w):
            with gathered([w]):
                return self.storage()[self._rows_cols(indices.to(w.device))].clone()
        if _sharded(w) is None:
            return self.storage()[self._rows_cols(indices.to(w.device))]
        full = w.full_tensor()
        return (full.t() if self.layer.weight_transposed else full)[self._rows_cols(indices.to(full.device))]

    @torch.no_grad()
    def read_base(self) -> None:
        """The active adapter's base = W at its positions; W must hold the pure weight there."""
        layer = self.layer
        if layer.weight.is_meta or layer.delta_indices.is_meta:
            return  # nothing to read yet: a materialization or a load reads it (the base stays stale)
        if layer.quantization is not None:
            base = values_at(layer.base_layer, layer.delta_indices)  # one dequantized copy of the layer, freed
        else:
            base = self.get(layer.delta_indices)
        delta = layer._active
        if delta.base.shape == base.shape and delta.base.dtype == base.dtype and delta.base.device == base.device:
            delta.base.copy_(base)
        else:
            delta.base = base
        self.stale = False

    def base(self) -> torch.Tensor:
        """W's own values at the tuned positions, read first if still unread."""
        if self.stale:
            self.read_base()
        return self.layer._active.base

    def reread_base(self) -> None:
        """The active adapter's positions (or W) changed while W is pure there: read its base again."""
        self.stale = True
        self.read_base()
