"""Putting adapters on a model and taking them off, all or none: both entry points add every adapter through
``add_adapter_to_model`` and give the base layers back through ``give_back_layers``."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .. import learning_rate
from ..config import ApetConfig
from ..errors import (ApetValueError)
from ..layer import SparseDeltaLinear, check_adapter_name
from ..linear_like import linear_shape
from ..merging import activation_dtype, merge_quantized
from ..serialization import (index_checksum)
from ..targets import replace_linears, set_module, shared_parameter_ids
from .choosing import initial_values


def add_adapter_to_model(model: nn.Module, config: ApetConfig, adapter_name: str,
                         indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
    """Put adapter ``adapter_name`` on the layers named in ``indices``, all or none; both entry points add every
    adapter through here. Plain linear layers are wrapped (holding K = 0 entries of the model's other adapters);
    APET layers get an entry (K = 0 where this adapter tunes nothing). ``config.layers`` records each tuned layer's
    shape, K and index checksum. The model's active adapters stay as they were."""
    check_adapter_name(adapter_name)
    values = {**initial_values(config, adapter_name, indices), **(values or {})}
    existing = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    if any(adapter_name in m.deltas for m in existing.values()):
        raise ApetValueError(f"this model's APET layers hold an adapter named {adapter_name!r} already")
    plain = {n: model.get_submodule(n) for n in indices if n not in existing}
    first = next(iter(existing.values()), None)  # (every APET layer knows every adapter)
    others, active = (list(first.deltas), first.active_adapters) if first is not None else ([], None)
    check_shared_weights(plain)
    shared = shared_parameter_ids(model)
    new = replace_linears(model, lambda name, module: SparseDeltaLinear.from_linear(
        module, indices=indices[name], strategy=config.strategy, backend=config.backend,
        weight_shared=id(module.weight) in shared, adapter_name=adapter_name), plain) if plain else {}
    try:
        for name, layer in new.items():
            if values.get(name) is not None:
                with torch.no_grad():
                    layer.deltas[adapter_name].values.copy_(values[name])
            for other in others:
                layer.add_adapter(other, layer.empty_indices())
            if active is not None:
                layer.set_adapter([a for a in active if a in layer.deltas] or others[:1])
        add_entries(existing, adapter_name, indices, values)
    except BaseException:
        give_back_layers(model, new, merge=False, replacements={})
        raise
    config.layers = {name: {"shape": list(linear_shape(getattr(m, "base_layer", m))), "k": int(indices[name].numel()),
                            "checksum": index_checksum(indices[name])}
                     for name, m in ((n, model.get_submodule(n)) for n in indices)}


def add_entries(layers: dict[str, SparseDeltaLinear], name: str, indices: dict[str, torch.Tensor],
                values: dict[str, torch.Tensor]) -> None:
    """Add adapter ``name`` to every APET layer (K = 0 where it tunes nothing), inactive, all or none."""
    added = []
    try:
        for n, layer in layers.items():
            idx = indices.get(n, layer.empty_indices())
            layer.add_adapter(name, idx, values.get(n))
            added.append(layer)
    except BaseException:
        for layer in added:
            layer.deltas.pop(name)
        raise


def give_back_layers(model: nn.Module, layers: dict[str, SparseDeltaLinear], merge: bool,
                     replacements: dict[str, nn.Module]) -> None:
    """Put each layer's base layer back (merged: with W + S of its active adapter written into it; unmerged: W
    restored bit-exactly), or its replacement. Nothing here fails once the callers' checks passed."""
    for name, layer in layers.items():
        if name not in replacements:
            if merge:
                layer.bake()  # W[p] = cast(base + v), kept
            else:
                layer.unmerge()
        layer.release_weight()
        set_module(model, name, replacements.get(name, layer.base_layer))


def merged_replacements(model: nn.Module, layers: dict[str, SparseDeltaLinear], requantize
                        ) -> tuple[dict[str, nn.Module], dict]:
    """For merge_and_unload: the new module of each quantized layer (dequantized, W + S, requantized if asked)
    and the requantization report, all built before any layer changes."""
    quantized = {n: m for n, m in layers.items() if m.quantization is not None}
    if requantize is not False and not quantized:
        raise ApetValueError("requantize needs quantized layers; this model has none (its merged weights are "
                         "written in its own float dtype)")
    tied = [n for n, m in layers.items() if m.weight_shared]
    if tied:
        warnings.warn(f"merging into weights shared with other modules changes them too: {tied}")
    config = None if requantize is True or requantize is False else requantize
    dtype = activation_dtype(model)
    replacements, report = {}, {}
    for name, layer in quantized.items():
        replacements[name], report[name] = merge_quantized(layer, requantize is not False, config, dtype)
    return replacements, report


def adapter_dtype(model: nn.Module, adapter_name: str, autocast: bool) -> None:
    """PEFT's ``autocast_adapter_dtype``: True keeps the values in fp32 (APET's default, whatever W's dtype); False
    gives them the base weight's float dtype (bf16 / fp16 values for a bf16 / fp16 model)."""
    if autocast:
        return
    for layer in model.modules():
        if isinstance(layer, SparseDeltaLinear) and adapter_name in layer.deltas:
            values = layer.deltas[adapter_name].values
            if layer.base_dtype.is_floating_point and values.dtype != layer.base_dtype:
                values.data = values.data.to(layer.base_dtype)


def values_on_meta(model: nn.Module, adapter_name: str) -> None:
    """``low_cpu_mem_usage``: the adapter's values become empty meta tensors that a load with ``assign=True``
    replaces; until then its layers refuse to run it, naming the meta device."""
    for layer in model.modules():
        if isinstance(layer, SparseDeltaLinear) and adapter_name in layer.deltas:
            delta = layer.deltas[adapter_name]
            delta.values = nn.Parameter(torch.empty_like(delta.values, device="meta"),
                                        requires_grad=delta.values.requires_grad)


def note_lr_hint(model: nn.Module, name: str, config: ApetConfig) -> None:
    """Let an optimizer that trains this adapter's values at a rate its positions bear badly warn (learning_rate)."""
    layers = [layer for layer in model.modules() if isinstance(layer, SparseDeltaLinear) and name in layer.deltas]
    values = [layer.deltas[name].values for layer in layers]
    learning_rate.note_adapter(layers, values, config.method, sum(int(v.numel()) for v in values))


def check_shared_weights(targets: dict[str, nn.Module]) -> None:
    owners: dict[int, str] = {}
    for name, module in targets.items():
        other = owners.setdefault(id(module.weight), name)
        if other != name:
            raise ApetValueError(f"target modules {other!r} and {name!r} share one weight: two deltas on one weight "
                             f"cannot both be applied; exclude one of them (exclude_modules)")


def patched_in_place(model: nn.Module) -> bool:
    """Whether ``model`` is patched in place (get_apet_model / load_apet): the in-place entry point's record."""
    return "_apet_patch" in model.__dict__
