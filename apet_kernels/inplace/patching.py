"""``get_apet_model`` and ``load_apet``: patching a model in place, all or nothing."""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..adapters.registry import AdapterRegistry
from ..config import ApetConfig
from ..errors import (ApetValueError)
from ..layer import DEFAULT_ADAPTER, SparseDeltaLinear, check_adapter_name
from ..linear_like import is_linear_like, linear_shape
from ..load_guard import guard_ancestors
from ..selection import select_indices
from ..serialization import (VALUES, delta_key, read_folder)
from ..targets import within
from ..adapters.choosing import choose_positions, weight_at
from ..adapters.patching import add_adapter_to_model, check_shared_weights, note_lr_hint
from ..adapters.records import resolve_positions
from .hooks import _install_model_hooks
from .model import _apet_class
from .state import _Patch, is_patched


# ----------------------------------------------------------------------------- patching
def _modules_to_save(model: nn.Module, config: ApetConfig) -> dict[str, nn.Parameter]:
    """Name -> parameter of every module in ``modules_to_save``, under every name a tied parameter has."""
    return {n: p for n, p in model.named_parameters(remove_duplicate=False)
            if within(n.rpartition(".")[0], config.modules_to_save)}


def _check_targets(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    if is_patched(model) or any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ApetValueError("this model already has APET layers (unload() them first, or add_adapter() / "
                         "load_adapter() to add another adapter)")
    check_shared_weights(targets)


def _warn_tied_modules_to_save(model: nn.Module, saved: dict[str, nn.Parameter]) -> None:
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    for n, p in saved.items():
        others = [o for o in names_of[id(p)] if o not in saved]
        if others:
            warnings.warn(f"modules_to_save: {n} is tied to {others[0]} (the same tensor): training it trains both, "
                          f"and unload() restores both")


def _patch(model: nn.Module, config: ApetConfig, indices: dict[str, torch.Tensor],
           adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Patch the targets in place; if anything fails, the model is left exactly as it was."""
    check_adapter_name(adapter_name)
    _check_targets(model, {})
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    saved = _modules_to_save(model, config)
    _warn_tied_modules_to_save(model, saved)
    originals = {n: p.detach().clone() for n, p in saved.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in saved.values():
            p.requires_grad_(True)
        add_adapter_to_model(model, config, indices=indices, adapter_name=adapter_name)
    except BaseException:
        for name, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        raise
    model.__dict__["_apet_patch"] = _Patch(type(model), requires_grad, originals,
                                           AdapterRegistry({adapter_name: config}, [adapter_name]))
    model.__class__ = _apet_class(type(model))
    _install_model_hooks(model)
    guard_ancestors(model)
    note_lr_hint(model, adapter_name, config)
    return model


def get_apet_model(model: nn.Module, config: ApetConfig, calibration: Iterable | None = None,
                   loss_fn: Callable | None = None, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Replace the target linears of ``model`` in place with SparseDeltaLinear layers; returns ``model``,
    patched (see the module docstring).

    The budget is split over the targets in proportion to their size (split_budget). Each layer's
    positions come from select_indices(..., seed=config.seed, key=<qualified name>) for the seeded
    methods, from its own weight for ``method="magnitude"``, and for ``method="gradient"`` from
    the gradients of ``calibration`` (an iterable of batches: ``model(**batch).loss``, or
    ``loss_fn(model, batch)``), accumulated without ever forming a layer's dense weight gradient
    (apet_kernels.positions). Everything else is frozen except ``modules_to_save``. ``config`` is
    copied, not changed, so one config can patch several models. If anything fails, the model is
    left exactly as it was.
    """
    _check_targets(model, {})
    config = copy.deepcopy(config)
    config.layers = {}
    indices = choose_positions(model, config, calibration, loss_fn)
    return _patch(model, config, indices, adapter_name)


def load_apet(model: nn.Module, directory: str, *, strict: bool = False, backend: str = "auto") -> nn.Module:
    """Patch a base ``model`` in place with every adapter in ``directory`` (an APET folder of format 1 or 2:
    ``save_pretrained``'s output, or a Trainer checkpoint of a patched model), active as saved.

    Everything is checked before the model is touched: the modules exist and have the stored
    shapes, regenerated indices match their checksums, every tensor is present with the right
    shape and finite. The first mismatch raises a ValueError naming it, and the model stays as
    it was. If the base weights at the tuned positions differ from those the adapter was saved
    over (its fingerprints), this warns naming the layers, or raises with ``strict=True``.
    ``backend`` is a runtime choice (not stored in the adapter). To add an adapter to a patched model,
    use ``model.load_adapter(directory, adapter_name)``.
    """
    if is_patched(model) or any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ApetValueError("load_apet needs a base model without APET layers (call unload() first); "
                         "model.load_adapter(directory, adapter_name) adds an adapter to a patched model")
    backend = ApetConfig(num_params=0, backend=backend).backend  # validated like any config
    saved = read_folder(directory)
    modules = {n: m for n, m in model.named_modules() if n and is_linear_like(m)}
    positions = {name: resolve_positions(adapter, modules, linear_shape, weight_at, saved.path, strict, "")
                 for name, adapter in saved.adapters.items()}
    saved.check_one_save()
    first = saved.active[0]  # the adapter the model is patched with; the layers are all adapters' layers
    layers = [n for n in modules if any(n in p for p in positions.values())]
    empty = {n: select_indices(linear_shape(modules[n]), 0, key=n) for n in layers}
    config = copy.deepcopy(saved.adapters[first].config)
    config.backend = backend
    # modules_to_save belong to the model, saved with whichever adapter patched it
    config.modules_to_save = config.modules_to_save or next(
        (a.config.modules_to_save for a in saved.adapters.values() if a.config.modules_to_save), None)
    if len(saved.active) > 1 and config.strategy == "auto":
        config.strategy = "unmerged"  # (adapters active together add their terms unmerged)
    params = _modules_to_save(model, config)
    for key, t in saved.others.items():
        if key not in params:
            raise ApetValueError(f"{saved.path} holds {key!r}, which is neither an APET layer nor a parameter of "
                             f"modules_to_save in this model")
        if params[key].shape != t.shape:
            raise ApetValueError(f"{saved.path}: {key} has shape {tuple(t.shape)}, the model's is {tuple(params[key].shape)}")
    _patch(model, config, {n: positions[first].get(n, empty[n]) for n in layers}, first)
    config.layers = {n: info for n, info in config.layers.items() if n in positions[first]}
    try:
        for name, adapter in saved.adapters.items():
            if name != first:
                added = copy.deepcopy(adapter.config)
                added.backend = backend
                model._add_entries(name, added, positions[name], {})
        state = {delta_key(layer, name, VALUES): v for name, adapter in saved.adapters.items()
                 for layer, v in adapter.values.items()}
        state.update(saved.others)
        model.load_state_dict(state, strict=False)
        if saved.active != [first]:
            model.set_adapter(saved.active)
    except BaseException:
        model.unload()
        raise
    return model
