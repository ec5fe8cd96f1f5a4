"""Per-layer records of a saved adapter (shape, K, index checksum, base fingerprint): what a save writes and what a
load checks before anything changes, for both entry points."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..adapters.registry import first_few
from .._checks import check_index_content, check_index_meta
from ..config import ApetConfig
from ..errors import (AdapterFileError, ApetStateError, BaseMismatchError)
from ..layer import SparseDeltaLinear
from ..quantized import quantization_of
from ..schemes import is_seeded
from ..selection import select_indices
from ..serialization import (INDICES, SKETCH_QUANTIZATION_ONLY, VALUES, SavedAdapter, base_fingerprint, base_sketch,
                             index_checksum, regenerable, sketch_distance)
from ..sharded import full_tensor
from ..zero3 import is_gathered, is_partitioned


def saved_entry(layer: SparseDeltaLinear, adapter: str, config: ApetConfig, lname: str, info: dict
                ) -> dict[str, torch.Tensor]:
    """What a saved adapter holds of one layer: its values, and its indices unless the config's seed regenerates
    them; ``info`` (the config's entry for the layer) gets the checksum and the base fingerprint a load checks."""
    delta = layer.deltas[adapter]
    base = layer.current_base() if adapter == layer.active_adapter else layer.base_values_at(delta.indices)
    stored = not regenerable(config, lname, delta.indices)
    quant = layer.quantization
    info.update(checksum=index_checksum(delta.indices), base_fingerprint=base_fingerprint(base),
                base_sketch=base_sketch(base), base_quantization=str(quant) if quant is not None else None,
                positions="stored" if stored else "seed", k=int(delta.k))
    return {VALUES: delta.values, INDICES: delta.indices} if stored else {VALUES: delta.values}


def saved_tensor(state_dict: dict | None, key: str, own: torch.Tensor, written: bool = True) -> torch.Tensor:
    """The tensor a save writes under ``key``: the given state dict's where it holds it whole (a gathered one, from
    Trainer or accelerate), else the layer's own. A ZeRO-3 partitioned tensor is whole only while gathered: a save
    that would write it outside a gather is refused (gathering here would hang a save that one rank makes alone);
    ``written``: False where the caller computes the state dict but does not write it (a rank that is not the main
    process). A DTensor (FSDP2's sharded values) is gathered: a collective, so every rank saves, as with the
    in-place ``save_pretrained``."""
    given = state_dict.get(key) if state_dict else None
    whole_numel = own.ds_numel if is_partitioned(own) else own.numel()
    if given is not None and given.numel() == whole_numel:
        return full_tensor(given)
    if is_partitioned(own) and not is_gathered(own) and written:
        raise ApetStateError(
            f"{key} is partitioned by DeepSpeed ZeRO-3 (each rank holds a slice) and no gathered state dict was given: "
            "nothing was written. Save on every rank inside `with deepspeed.zero.GatheredParameters([p for p in "
            "model.parameters() if p.requires_grad]):` (the main process writes), or through Trainer.save_model")
    return full_tensor(own)


# ----------------------------------------------------------------------------- loading
def check_shape(name: str, info: dict, shape, where: str = "") -> None:
    """A layer record's shape is the model layer's, or raise naming both."""
    if list(shape) != list(info["shape"]):
        raise BaseMismatchError(f"adapter layer {name!r} has shape {tuple(info['shape'])}, the model's is "
                                f"{tuple(shape)}{where}")


def stores_positions(config: ApetConfig, info: dict) -> bool:
    """Whether a layer record's positions are stored with its adapter (data-driven or moved), not drawn from a
    seed."""
    return not is_seeded(config.method) or info.get("positions") == "stored"


def seeded_indices(config: ApetConfig, name: str, info: dict) -> torch.Tensor | None:
    """The positions a layer record's seed gives (its config's scheme and seed, the layer's name, shape and K), or
    None where the record says its positions are stored, not seeded. Every site that regenerates positions asks
    here, and checks them with ``check_record``."""
    if stores_positions(config, info):
        return None
    return select_indices(tuple(info["shape"]), int(info["k"]), method=config.method, seed=config.seed, key=name)


def check_record(indices: torch.Tensor, name: str, info: dict, what: str = "indices") -> None:
    """``indices`` are the positions the record describes (its K and index checksum), or raise naming ``what``."""
    if indices.numel() != int(info["k"]) or index_checksum(indices) != info["checksum"]:
        raise AdapterFileError(f"adapter layer {name!r}: {what} do not match the stored checksum (other seed, key or "
                               "selection code?)")


def saved_positions(adapter: SavedAdapter, name: str, path: str) -> torch.Tensor:
    """A saved layer's positions: stored ones checked as indices into its recorded shape, or regenerated from the
    seed; either way checked against its record (K, checksum)."""
    info = adapter.config.layers[name]
    idx = adapter.indices.get(name)
    numel = int(info["shape"][0]) * int(info["shape"][1])
    if idx is None:
        idx = seeded_indices(adapter.config, name, info)
        if idx is None:
            raise AdapterFileError(f"{path} lacks the stored positions of adapter layer {name!r}")
    else:
        try:
            check_index_meta(idx, numel)
            check_index_content(idx, numel)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"{path}: positions of {name}: {exc}") from None
    check_record(idx, name, info)
    return idx


def resolve_positions(adapter: SavedAdapter, modules: dict[str, nn.Module], shape_of, base_at, path: str,
                       strict: bool, what: str) -> dict[str, torch.Tensor]:
    """Each adapter layer's positions, checked against ``modules`` (shape, checksum, base fingerprint)."""
    config, indices, foreign, requantized = adapter.config, {}, [], []
    for name, info in config.layers.items():
        module = modules.get(name)
        if module is None:
            raise BaseMismatchError(f"adapter layer {name!r} is not a linear layer of this model {what}")
        shape = shape_of(module)
        check_shape(name, info, shape)
        idx = saved_positions(adapter, name, path)
        stored = info.get("base_fingerprint")
        if stored is not None and not module.weight.is_meta:
            base = base_at(module, idx)
            if base_fingerprint(base) != stored:
                quant = quantization_of(getattr(module, "base_layer", module))
                quant = str(quant) if quant is not None else None
                sketch = info.get("base_sketch")
                if quant != info.get("base_quantization") and sketch is not None \
                        and sketch_distance(base_sketch(base), sketch) <= SKETCH_QUANTIZATION_ONLY:
                    requantized.append(f"{name} ({info.get('base_quantization') or 'float'} -> {quant or 'float'})")
                else:
                    foreign.append(name)
        indices[name] = idx
    if requantized:
        warnings.warn(f"the base differs from the one the adapter was trained on only by quantization in "
                      f"{len(requantized)} of {len(config.layers)} adapter layers ({first_few(requantized)}): its "
                      f"weights at the tuned positions are a quantized (or dequantized) copy of those, so the "
                      f"deltas apply on a slightly different base")
    if foreign:
        message = (f"base fingerprint mismatch in {len(foreign)} of {len(indices)} adapter layers "
                   f"({first_few(foreign)}): this model's weights at the tuned positions differ from those the "
                   f"adapter was trained on")
        if strict:
            raise BaseMismatchError(message + " (strict=True)")
        warnings.warn(message)
    return indices
