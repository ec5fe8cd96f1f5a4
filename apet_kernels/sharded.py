"""Tensors that torch.distributed shards (DTensor: FSDP2's parameters between steps), seen as whole ones where a
K-sized tensor must be read or written whole, and as local blocks where a weight is written in place."""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered (a collective: every rank calls it), a plain one returned."""
    return t.full_tensor() if is_dtensor(t) else t


def local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """A DTensor's local tensor, and the offset and shape of the block of the whole tensor it holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if any(p.is_partial() for p in t.placements):
        raise NotImplementedError(f"a tensor with partial placements {t.placements} holds no values of its own")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t._local_tensor, tuple(offset), tuple(shape)


@torch.no_grad()
def assign_full(t: torch.Tensor, full: torch.Tensor) -> None:
    """t = full, in place: a DTensor's local block gets its part of ``full`` (which every rank holds whole)."""
    if not is_dtensor(t):
        t.copy_(full)
        return
    local, offset, shape = local_block(t)
    block = full.to(local.device)
    for dim, (o, n) in enumerate(zip(offset, shape)):
        block = block.narrow(dim, o, n)
    local.copy_(block)


def average_gradient_over_ranks(param: torch.nn.Parameter) -> None:
    """A trainable Parameter added beside weights that are already sharded (an adapter patched after ``fully_shard``,
    or into a model transformers sharded as it loaded): FSDP2 reduces only what it sharded, so each rank would train
    its own copy on its own batch. As DDP would, it starts equal on every rank (broadcast from rank 0: a collective,
    every rank patches) and its gradient is averaged over the ranks after each backward. transformers' Trainer does
    the same for such parameters and skips those carrying the mark set here, so nothing is reduced twice."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1 or \
            getattr(param, "_replicated_grad_hook_registered", False):
        return
    with torch.no_grad():
        dist.broadcast(param.data, src=0)

    def average(p):
        dist.all_reduce(p.grad)  # (a sum, then / world: gloo has no AVG)
        p.grad /= dist.get_world_size()
    param.register_post_accumulate_grad_hook(average)
    param._replicated_grad_hook_registered = True
