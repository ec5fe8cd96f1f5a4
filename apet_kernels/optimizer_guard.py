"""A warning when an optimizer steps over adapters that are no longer trained.

Every adapter keeps its own values Parameters, so switching adapters never replaces a Parameter an
optimizer holds. But an optimizer built while adapter "a" was active and stepped after
``set_adapter("b")`` trains nothing: a's values get no gradient, b's are not in it. Once any adapter
switch has happened, a check run by the one optimizer step pre-hook (apet_kernels.process_hooks) looks at each
optimizer's parameters; an optimizer holding inactive adapters' values and no active ones warns once.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable

import torch

from . import process_hooks

_MARK = "_apet_adapter_active"  # on each values Parameter: True (active) / False; an attribute, not a weak
# reference (torch.utils.swap_tensors, which .to() uses for tensor subclasses, refuses weakly referenced tensors)
_WARNED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def note_active_values(user, active: Iterable[torch.Tensor], inactive: Iterable[torch.Tensor]) -> None:
    """Record which adapter values are trained now (called by SparseDeltaLinear, ``user``, on every switch)."""
    inactive = list(inactive)
    for p in active:
        setattr(p, _MARK, True)
    for p in inactive:
        setattr(p, _MARK, False)
    if inactive:
        process_hooks.add_optimizer_check(user, _check_step)


def _check_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if optimizer in _WARNED:
        return
    marks = [getattr(p, _MARK, None) for group in optimizer.param_groups for p in group["params"]]
    orphans = marks.count(False)
    if orphans and True not in marks:
        _WARNED.add(optimizer)
        warnings.warn(f"{type(optimizer).__name__} steps over {orphans} values tensors of adapters that are not "
                      f"active any more (set_adapter() was called after the optimizer was built) and over none of "
                      f"the active adapter's: nothing is being trained. Build the optimizer after set_adapter(), "
                      f"from the parameters that require grad", RuntimeWarning, stacklevel=3)
