"""What patching a model in place changed, kept on the model (``_apet_patch``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..adapters.registry import AdapterRegistry
from ..errors import (ApetStateError)


@dataclass
class _Patch:
    """What patching changed on a model, to give it back, and the model-level adapter state."""
    original_class: type
    requires_grad: dict[str, bool]  # every parameter's flag before patching
    saved_modules: dict[str, torch.Tensor]  # modules_to_save as they were (unload() restores them)
    adapters: AdapterRegistry = field(default_factory=AdapterRegistry)  # configs by name, active ones, mixed batch
    call_owns_mixed: bool = False  # the current call started it (model(..., adapter_names=))
    originals_in_use: bool = False  # modules_to_save hold their weights as patched (disabled; saved_modules: trained)
    base_row_hooks: list = field(default_factory=list)  # a mixed batch's hooks on modules_to_save (_BaseRows)


def _patch_of(model: nn.Module) -> _Patch:
    """What patching changed; refuses, naming why, on a model already unloaded (a method bound before)."""
    patch = model.__dict__.get("_apet_patch")
    if patch is None:
        raise ApetStateError("this model's APET layers were removed by unload() or merge_and_unload(); patch it "
                             "again with get_apet_model or load_apet")
    return patch


def is_patched(model: nn.Module) -> bool:
    return "_apet_patch" in model.__dict__
