"""The model-level hooks of a model patched in place: mixed batches (their rows, and ``__base__`` rows of
modules_to_save), and loads (legacy prefixes, training states). Installed by patching, removed by unload()."""

from __future__ import annotations


import torch
import torch.nn as nn

from ..errors import (ApetValueError)
from ..load_guard import guard
from ..adapters.mixed_batch import BASE
from ..serialization import (VALUES)
from .state import _Patch


# ----------------------------------------------------------------------------- model-level hooks
class _BaseRows:
    """A forward hook on one module of modules_to_save during a mixed batch: its output's ``"__base__"`` rows are
    replaced by those of the same call with the module's weights as patched (``torch.func.functional_call``)."""

    def __init__(self, patch: _Patch, name: str):
        self.patch, self.name, self.running = patch, name, False

    def __call__(self, module, args, kwargs, output):
        plan = self.patch.adapters.mixed
        rows = [i for i, n in enumerate(plan.row_names) if n == BASE] if plan is not None else []
        if self.running or not rows:
            return output
        if not torch.is_tensor(output) or output.dim() == 0 or output.shape[0] != len(plan.row_names):
            raise ApetValueError(f"modules_to_save {self.name!r} returned {type(output).__name__} without one row per "
                                 f"batch row: its '{BASE}' rows cannot run the base model's weights")
        prefix = self.name + "."
        originals = {k[len(prefix):]: t for k, t in self.patch.saved_modules.items() if k.startswith(prefix)}
        self.running = True
        try:
            base = torch.func.functional_call(module, originals, args, kwargs)
        finally:
            self.running = False
        output = output.clone()
        index = torch.tensor(rows, device=output.device)
        output.index_copy_(0, index, base.index_select(0, index).to(output.dtype))
        return output


def _forward_pre_hook(model, args, kwargs):
    patch = model.__dict__.get("_apet_patch")
    names = kwargs.pop("adapter_names", None)
    if patch is None:
        return args, kwargs
    if names is not None:
        model._begin_mixed_batch(names)  # (ended by _forward_hook, which runs even if the forward raises)
        patch.call_owns_mixed = True
    if patch.adapters.mixed is not None:
        try:
            patch.adapters.mixed.begin_forward(args, kwargs)
        except BaseException:
            _forward_hook(model, args, kwargs, None)
            raise
    return args, kwargs


def _forward_hook(model, args, kwargs, output):
    patch = model.__dict__.get("_apet_patch")
    if patch is not None and patch.call_owns_mixed:
        model._end_mixed_batch()


def _strip_legacy_prefix(model, state_dict, prefix, *args):
    """State dicts of 0.1/0.2's wrapper held every key under ``base_model.``."""
    if prefix or not state_dict or not all(k.startswith("base_model.") for k in state_dict):
        return
    if any(k.startswith("base_model.") for k in model.state_dict(keep_vars=True)):
        return
    for key in list(state_dict):
        state_dict[key[len("base_model."):]] = state_dict.pop(key)


def _note_training_state(model, state_dict, prefix, *args) -> None:
    """Is this a training state (deltas and trainable parameters, no frozen weights, as save_pretrained and
    Trainer checkpoints hold)? Then the frozen weights it lacks are not reported missing."""
    if prefix:
        return
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.__dict__["_apet_loading_training_state"] = any(".deltas." in k for k in state_dict) and \
        not any(k in frozen for k in state_dict)


def _training_state_missing_keys(model, incompatible_keys) -> None:
    if not model.__dict__.pop("_apet_loading_training_state", False):
        return
    needed = {n for n, p in model.named_parameters() if p.requires_grad}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k in needed or k.endswith(f".{VALUES}") and ".deltas." in k]


_LOAD_PRE_HOOKS = (_strip_legacy_prefix, _note_training_state)


def _install_model_hooks(model: nn.Module) -> None:
    for hook in _LOAD_PRE_HOOKS:  # before load_guard's whole-state-dict check, which reads the keys
        model._register_load_state_dict_pre_hook(hook, with_module=True)
    guard(model)
    model.register_load_state_dict_post_hook(_training_state_missing_keys)
    model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    model.register_forward_hook(_forward_hook, with_kwargs=True, always_call=True)


def _remove_model_hooks(model: nn.Module) -> None:
    ours = set(_LOAD_PRE_HOOKS) | {_training_state_missing_keys, _forward_pre_hook, _forward_hook}
    for hooks in (model._load_state_dict_pre_hooks, model._load_state_dict_post_hooks, model._forward_pre_hooks,
                  model._forward_hooks):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) in ours]:
            del hooks[key]
            for extra in (model._forward_pre_hooks_with_kwargs, model._forward_hooks_with_kwargs,
                          model._forward_hooks_always_called):
                extra.pop(key, None)
