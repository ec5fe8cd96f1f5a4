"""The rule of strategy="auto" where it chose merged for speed alone: such a layer unmerges by itself where several
adapters apply at once (set together, a mixed batch) and merges again once one applies; an explicit "merged" refuses
those instead, and so does a layer merged by PEFT's merge_adapter() (its ``merged_adapters``)."""

from __future__ import annotations

import torch

from ..errors import ApetValueError
from ..strategies import MERGED


def switches_itself(layer) -> bool:
    """An "auto" layer running merged for speed, not merged by merge_adapter(): it unmerges by itself where
    several adapters apply."""
    return layer._auto_merged and not layer.merged_adapters


@torch.no_grad()
def unmerge_for_several(layer, why: str) -> None:
    """Before several adapters apply at once (set together, a mixed batch): unmerged, or refused."""
    if layer._strategy.applies_several:
        return
    if not switches_itself(layer):
        raise ApetValueError(f"{why} add their sparse terms unmerged, and this layer is merged (strategy="
                             f"'merged' or merge_adapter()): unmerge() it or use strategy='unmerged' or 'auto'")
    layer.unmerge()
    layer._unmerged_for_now = True


@torch.no_grad()
def merge_again(layer) -> None:
    """After the rule above: merged again once one adapter applies."""
    if layer._unmerged_for_now and len(layer._active_adapter) == 1 and layer._mixed is None \
            and layer.merge_legality()[0]:
        MERGED.enter(layer)
        layer._become(MERGED)
        layer._unmerged_for_now = False
