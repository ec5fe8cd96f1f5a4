"""Every process-wide hook apet_kernels installs, in one place. ``import apet_kernels`` installs none (it only
enters APET into PEFT's method registry). Each hook is installed on first use, for a user (an APET layer, APET's
PEFT tuner), with a handle kept here; when the last user is released (``unload()`` / ``merge_and_unload()`` give
their layers back), every handle is removed.

- ``module registration`` (torch.nn.modules.module.register_module_module_registration_hook): a module that
  receives an APET layer as a child gets load_guard's whole-state-dict check, and a PeftModel that receives
  APET's tuner is adopted by it (apet_kernels.load_guard, apet_kernels.peft_method.tuner).
- ``optimizer step`` (torch.optim.optimizer.register_optimizer_step_pre_hook): one pre-hook runs the checks
  registered with ``add_optimizer_check`` (an optimizer stepping over inactive adapters: optimizer_guard; a rate
  far above the suggested one: learning_rate), each once per optimizer.

Tests reset the state with ``release_all()``.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_USERS: "weakref.WeakSet" = weakref.WeakSet()
_HANDLES: dict[str, object] = {}  # hook name -> torch's RemovableHandle
_OPTIMIZER_CHECKS: list[Callable] = []


def installed() -> list[str]:
    """The names of the hooks installed now."""
    return sorted(_HANDLES)


def acquire(user, name: str, register: Callable, hook: Callable) -> None:
    """``user`` needs ``hook``: registered with torch through ``register`` unless it is installed already."""
    _USERS.add(user)
    if name not in _HANDLES:
        _HANDLES[name] = register(hook)


def add_optimizer_check(user, check: Callable) -> None:
    """Run ``check(optimizer, args, kwargs)`` before every optimizer step, from one global pre-hook."""
    if check not in _OPTIMIZER_CHECKS:
        _OPTIMIZER_CHECKS.append(check)
    acquire(user, "optimizer step", register_optimizer_step_pre_hook, _run_optimizer_checks)


def release(user) -> None:
    """``user`` is gone (unloaded): with no user left, every hook is removed."""
    _USERS.discard(user)
    if not len(_USERS):
        release_all()


def release_all() -> None:
    for handle in _HANDLES.values():
        handle.remove()
    _HANDLES.clear()
    _OPTIMIZER_CHECKS.clear()
    _USERS.clear()


def _run_optimizer_checks(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for check in list(_OPTIMIZER_CHECKS):
        check(optimizer, args, kwargs)
