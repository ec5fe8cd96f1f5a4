"""A load_state_dict that fails changes nothing, for any module tree holding SparseDeltaLinear layers.

torch loads a state dict module by module, top-down, each module copying its own tensors as it is
reached: a bad entry found in the last layer comes after the first layers were overwritten. So every
ancestor of an APET layer gets a load pre-hook that checks the whole incoming state dict against its
subtree (every APET layer's entries, every tensor's shape) before anything below it copies. With
``strict=True`` torch reports missing and unexpected keys only after every copy, and tells hooks nothing of
``strict``: APET layers and patched models check the key set in their own ``load_state_dict`` first
(``check_strict_keys``). The
outermost one checks; the others see that this load (one ``error_msgs`` list per ``load_state_dict``
call) was checked already.

Ancestors get the hook when the tree is built bottom-up (a global module-registration hook, installed by the first
APET layer or tuner, apet_kernels.process_hooks: a module receiving an APET layer, or a module that has the hook, as
a child) and from ``replace_linears`` / ``get_apet_model`` for trees patched in place.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from . import process_hooks
from .errors import StateDictError

# id(error_msgs) -> (error_msgs, the checking module, weakly): one entry per load in progress, dropped by the checking
# module's post-hook. A load that another library's hook breaks off never reaches it: the weak reference keeps that
# entry from holding the model, and the next load that starts here drops such entries.
_CHECKED: dict[int, tuple[list, weakref.ref]] = {}
_FLAG = "_apet_load_guard"


def is_apet_layer(module: nn.Module) -> bool:
    """A SparseDeltaLinear (recognized by its class marker: this module sits below layers.py)."""
    return getattr(type(module), "_apet_layer", False)


def already_checked(error_msgs: list) -> bool:
    entry = _CHECKED.get(id(error_msgs))
    return entry is not None and entry[0] is error_msgs


def check_tree_state_dict(module: nn.Module, state_dict, prefix: str, assign: bool = False) -> None:
    """Every APET layer's entries and every tensor's shape under ``module``, before any copy (``assign``: the
    incoming tensors are to become the modules' own)."""
    for name, sub in module.named_modules(remove_duplicate=False):
        sub_prefix = f"{prefix}{name}." if name else prefix
        if is_apet_layer(sub):
            sub.upgrade_state_dict(state_dict, sub_prefix)
            sub.check_state_dict(state_dict, sub_prefix, assign)
        tensors = list(sub._parameters.items()) + [(n, b) for n, b in sub._buffers.items()
                                                   if n not in sub._non_persistent_buffers_set]
        for pname, mine in tensors:
            theirs = state_dict.get(sub_prefix + pname)
            if mine is None or not torch.is_tensor(theirs) or nn.parameter.is_lazy(mine):
                continue
            if theirs.shape != mine.shape and not (mine.dim() == 0 and tuple(theirs.shape) == (1,)):
                raise StateDictError(f"size mismatch for {sub_prefix}{pname}: copying a param with shape "
                                     f"{tuple(theirs.shape)} from checkpoint, the shape in current model is "
                                     f"{tuple(mine.shape)} (nothing was loaded)")


def expected_keys(module: nn.Module) -> set[str]:
    """The keys ``load_state_dict`` looks for under ``module``: every path to a parameter, a persistent buffer or
    an extra state (shared modules under each of their paths, as torch walks them)."""
    keys = set()
    for name, sub in module.named_modules(remove_duplicate=False):
        sub_prefix = f"{name}." if name else ""
        keys |= {sub_prefix + n for n, p in sub._parameters.items() if p is not None}
        keys |= {sub_prefix + n for n, b in sub._buffers.items()
                 if b is not None and n not in sub._non_persistent_buffers_set}
        if type(sub).get_extra_state is not nn.Module.get_extra_state:
            keys.add(sub_prefix + "_extra_state")
    return keys


def check_strict_keys(module: nn.Module, state_dict) -> None:
    """What ``load_state_dict(strict=True)`` refuses only after copying everything (missing or unexpected keys),
    refused before anything is copied. Called by the ``load_state_dict`` of APET layers and patched models: the
    load hooks cannot do it, since torch passes them strict=True whatever the caller asked."""
    if any(getattr(hook, "__module__", "").split(".")[0] != "apet_kernels"
           for sub in module.modules() for hook in sub._load_state_dict_post_hooks.values()):
        return  # another library's post-hook may clear missing or unexpected keys: torch's own strict check decides
    upgraded = dict(state_dict)  # old keys moved to where they live now, as each layer's load pre-hook will
    for name, sub in module.named_modules(remove_duplicate=False):
        if is_apet_layer(sub):
            sub.upgrade_state_dict(upgraded, f"{name}." if name else "")
    expected = expected_keys(module)
    incoming = set(upgraded)
    missing, unexpected = sorted(expected - incoming), sorted(incoming - expected)
    if missing or unexpected:
        parts = ([f"Missing key(s) in state_dict: {', '.join(map(repr, missing))}."] if missing else []) + \
                ([f"Unexpected key(s) in state_dict: {', '.join(map(repr, unexpected))}."] if unexpected else [])
        raise StateDictError(f"Error(s) in loading state_dict for {type(module).__name__} (strict=True; nothing was "
                             "loaded):\n\t" + "\n\t".join(parts))


def _pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if already_checked(error_msgs):
        return
    for key in [k for k, (_, owner) in _CHECKED.items() if owner() is None or owner() is module]:
        del _CHECKED[key]  # (broken-off loads: a module starts one load at a time)
    _CHECKED[id(error_msgs)] = (error_msgs, weakref.ref(module))
    try:
        check_tree_state_dict(module, state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
    except BaseException:
        del _CHECKED[id(error_msgs)]
        raise


def _post_hook(module, incompatible_keys) -> None:
    for key, (_, owner) in list(_CHECKED.items()):
        if owner() is module:
            del _CHECKED[key]


def guard(module: nn.Module) -> None:
    """Give ``module`` the whole-state-dict check (once)."""
    if module.__dict__.get(_FLAG):
        return
    module._register_load_state_dict_pre_hook(_pre_hook, with_module=True)
    module.register_load_state_dict_post_hook(_post_hook)
    module.__dict__[_FLAG] = True


def unguard(module: nn.Module) -> None:
    """Remove the check (after unloading the APET layers)."""
    if not module.__dict__.pop(_FLAG, False):
        return
    for hooks in (module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) in (_pre_hook, _post_hook)]:
            del hooks[key]


def guard_ancestors(root: nn.Module) -> None:
    """Guard ``root`` and every module between it and its APET layers."""
    layers = [name for name, m in root.named_modules() if is_apet_layer(m)]
    ancestors = {""} | {name.rsplit(".", i)[0] for name in layers for i in range(1, name.count(".") + 1)}
    for name in ancestors:
        guard(root.get_submodule(name))


def unguard_tree(root: nn.Module) -> None:
    for module in root.modules():
        unguard(module)


class StrictFirst:
    """An instance's ``load_state_dict`` that refuses a wrong key set before copying anything when strict (what
    ApetModel and SparseDeltaLinear do in their own class), for a module whose class is another library's: the
    PeftModel over an ApetTuner. A callable object, not a closure, so the module still pickles."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_strict_keys(self.module, state_dict)
        return type(self.module).load_state_dict(self.module, state_dict, strict=strict, assign=assign)


def _on_registration(parent: nn.Module, name: str, child):
    if torch.compiler.is_compiling():  # (modules registered inside a traced forward: nothing to load there)
        return None
    if child is not None and (is_apet_layer(child) or child.__dict__.get(_FLAG)):
        guard(parent)
    adopted = getattr(type(child), "_apet_adopted_by", None) if child is not None else None
    if adopted is not None:  # (PeftModel.base_model = ApetTuner(...): apet_kernels.tuner)
        adopted(child, parent)
    return None


def needed_by(user) -> None:
    """An APET layer or APET's PEFT tuner exists: module registrations are watched from now on (the hook's handle
    lives in apet_kernels.process_hooks, which removes it when the last user is released)."""
    process_hooks.acquire(user, "module registration", torch.nn.modules.module.register_module_module_registration_hook,
                          _on_registration)
