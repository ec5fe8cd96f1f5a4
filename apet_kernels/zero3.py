"""Parameters that DeepSpeed ZeRO-3 partitions: each rank keeps a slice (``ds_tensor``) and ``.data`` is an empty
placeholder except while a module's forward or backward, or a ``GatheredParameters`` block, has gathered it. A leaf
module: what reads a weight's shape or values, or writes W + S, asks here first. DeepSpeed is imported only where a
partitioned parameter is met, so nothing here needs it installed.
"""

from __future__ import annotations

import contextlib

import torch


def is_partitioned(t) -> bool:
    """A ZeRO-3 parameter (gathered now or not)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def is_gathered(t) -> bool:
    """A ZeRO-3 parameter whose ``.data`` holds the whole tensor now (a forward, a backward or a gather block)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return t.ds_status == ZeroParamStatus.AVAILABLE and t.data.numel() == t.ds_numel


def full_shape(t: torch.Tensor) -> torch.Size:
    """The whole tensor's shape, partitioned or not."""
    return torch.Size(t.ds_shape) if is_partitioned(t) else t.shape


def gathered(tensors, write: bool = False):
    """A block inside which the ZeRO-3 parameters among ``tensors`` hold their whole values (a collective: every rank
    enters it); ``write``: what rank 0 writes into them is partitioned again at the end. Others pass through."""
    params = [t for t in tensors if is_partitioned(t)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 parameter's whole value, detached (gathered: a collective, every rank calls it); another tensor as
    it is."""
    if not is_partitioned(t) or is_gathered(t):
        return t.detach()
    with gathered([t]):
        return t.data.detach().clone()
