"""Tensor parallelism (torch's ``parallelize_module`` with ColwiseParallel / RowwiseParallel, transformers'
``DistributedConfig(tp_size=N)`` / ``tp_plan``): a linear's weight is a DTensor sharded by rows (colwise: each rank
computes its slice of the output from the whole input) or by columns (rowwise: each rank takes its slice of the input
and the engine sums the partial outputs).

Each rank owns the deltas that fall in its block (``TensorParallelBlock``): the merged strategy writes them into its
local shard, so the forward and dx are the engine's own GEMMs and collectives, and the SDDMM computes their gradient
from the rank's local dy and x (``OwnedDeltas``: their positions in the local block, and their row layout). The values
stay one Parameter of all K deltas, the same on every rank: a rank's gradient holds its own deltas' entries and zeros
elsewhere, and is summed over the tensor-parallel group after each backward (``sum_gradient_over_group``), so every
rank steps the same values and saves the folder one process writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .ops.layout import DeltaLayout, build_layout
from .sharded import is_dtensor, local_block


@dataclass(frozen=True)
class TensorParallelBlock:
    """The block of the (out, in) weight one rank holds: rows [start, stop) (dim 0, colwise) or columns (dim 1,
    rowwise), and the group its ranks form."""
    dim: int
    start: int
    stop: int
    group: object


def _parallelized(module: nn.Module) -> bool:
    """A module a tensor-parallel plan was applied to: transformers marks it, torch's distribute_module hooks it."""
    if getattr(module, "_is_hooked", False):
        return True
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    return any("distribute_module" in getattr(h, "__qualname__", "") for h in hooks)


def tensor_parallel_block(module: nn.Module) -> TensorParallelBlock | None:
    """This rank's block of a tensor-parallel linear's weight; None for any other layer (FSDP2's sharded weights
    included: FSDP gathers them whole for each forward)."""
    weight = module._parameters.get("weight")
    if not is_dtensor(weight) or not _parallelized(module):
        return None
    from torch.distributed.tensor import Shard
    placements = weight.placements
    if weight.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
        raise NotImplementedError(f"a tensor-parallel weight placed as {placements} on a {weight.device_mesh.ndim}-D "
                                  "mesh: APET supports rows (ColwiseParallel) or columns (RowwiseParallel) on one "
                                  "mesh dimension")
    dim = placements[0].dim % 2
    _, offset, shape = local_block(weight)
    return TensorParallelBlock(dim, offset[dim], offset[dim] + shape[dim], weight.device_mesh.get_group())


class OwnedDeltas:
    """One adapter's deltas in one rank's block: which of the K they are (``own``), their flat positions in the
    local (out, in) block (sorted, as the kernels want) and its row layout."""

    def __init__(self, block: TensorParallelBlock, indices: torch.Tensor, shape: tuple[int, int]):
        out_features, in_features = shape
        idx = indices.long()
        rows, cols = idx // in_features, idx % in_features
        mine = ((rows if block.dim == 0 else cols) >= block.start) & ((rows if block.dim == 0 else cols) < block.stop)
        self.own = mine.nonzero().squeeze(1)
        width = block.stop - block.start
        if block.dim == 0:
            local, self.shape = (rows[mine] - block.start) * in_features + cols[mine], (width, in_features)
        else:
            local, self.shape = rows[mine] * width + cols[mine] - block.start, (out_features, width)
        self.indices = local.to(indices.dtype)
        self.layout: DeltaLayout = build_layout(self.indices, self.shape, columns=False)
        self.stamp = (indices.data_ptr(), indices._version, indices.numel())


def owned_deltas(layer, block: TensorParallelBlock) -> OwnedDeltas:
    """The active adapter's OwnedDeltas, built again where its positions changed (an adapter switch, regrowth)."""
    cache = layer.__dict__.setdefault("_owned_deltas", {})
    indices = layer.delta_indices
    owned = cache.get(layer.active_adapter)
    if owned is None or owned.stamp != (indices.data_ptr(), indices._version, indices.numel()):
        owned = cache[layer.active_adapter] = OwnedDeltas(block, indices, (layer.out_features, layer.in_features))
    return owned


def sum_gradient_over_group(param: nn.Parameter, group) -> None:
    """Each rank's gradient holds its own deltas' entries: their sum over the group is the whole gradient. Marked as
    transformers' Trainer marks the parameters it reduces itself, so it leaves this one alone."""
    import torch.distributed as dist
    if getattr(param, "_replicated_grad_hook_registered", False):
        return

    def total(p):
        dist.all_reduce(p.grad, group=group)
    param.register_post_accumulate_grad_hook(total)
    param._replicated_grad_hook_registered = True
