"""Loading folders into a PeftModel over APET: positions of a folder's config (``saved_positions``), an all-or-nothing
``load_adapter``, and the errors that name a damaged folder."""

from __future__ import annotations

import copy
import json
import os
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..config import ApetConfig
from ..errors import (AdapterFileError, AdapterFileNotFoundError, BaseMismatchError)
from ..layer import SparseDeltaLinear
from ..linear_like import is_linear_like, linear_shape
from ..adapters.records import check_record, check_shape, seeded_indices
from ..selection import select_indices
import contextvars


# calibration batches for method="gradient", which PEFT's get_peft_model has no argument for (get_peft_model below)
_CALIBRATION: contextvars.ContextVar = contextvars.ContextVar("apet_calibration", default=(None, None))


def saved_positions(model: nn.Module, config: ApetConfig) -> dict[str, torch.Tensor]:
    """The positions of an adapter whose config was saved with its layers (``from_pretrained``, ``load_adapter``):
    seeded ones drawn again and checked against their checksum; stored ones are placeholders of the right K that
    the checkpoint's indices replace (``_remap_adapter_state_dict_for_load`` refuses a checkpoint without them)."""
    modules = {n: m for n, m in model.named_modules() if n and (is_linear_like(m) or isinstance(m, SparseDeltaLinear))}
    indices = {}
    for name, info in config.layers.items():
        module = modules.get(name)
        if module is None:
            raise BaseMismatchError(f"adapter layer {name!r} is not a linear layer of this model")
        shape = (module.out_features, module.in_features) if isinstance(module, SparseDeltaLinear) else \
            linear_shape(module)
        check_shape(name, info, shape)
        idx = seeded_indices(config, name, info)
        if idx is not None:
            check_record(idx, name, info, "the positions its seed gives")
        else:  # (placeholders of the right K)
            idx = select_indices(shape, int(info["k"]), method="random", seed=0, key=name)
        indices[name] = idx
    return indices


class _AllOrNothingLoadAdapter:
    """A PeftModel's ``load_adapter`` that leaves the model as it was when it fails (PEFT's adds the adapter, then
    loads its tensors, and keeps the adapter if that fails: a model that could no longer run when its positions
    are stored). A new name is deleted again; the adapter ``PeftModel.from_pretrained`` built for the folder it
    failed to load is unloaded, so the caller's base model gets its own layers back. A callable object, not a
    closure, so the model still pickles."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def __call__(self, model_id, adapter_name, *args, **kwargs):
        model = self.peft_model
        new = adapter_name not in model.peft_config
        tuner = model.base_model
        live = None if new else _folder_config(model_id, kwargs.get("subfolder"))
        if live is not None:
            tuner.__dict__.setdefault("_folder_for_live", {})[adapter_name] = live
        try:
            result = type(model).load_adapter(model, model_id, adapter_name, *args, **kwargs)
        except BaseException as exc:
            tuner = model.base_model
            if new and adapter_name in model.peft_config:
                model.delete_adapter(adapter_name)
            elif adapter_name in tuner.__dict__.get("_never_loaded", ()) and list(model.peft_config) == [adapter_name]:
                base = tuner._unload_and_optionally_merge(merge=False)
                flags = tuner.__dict__.get("_flags_before", {})
                for name, p in base.named_parameters():  # (PEFT froze the base when it built the adapter)
                    p.requires_grad_(flags.get(name, p.requires_grad))
            damaged = _damaged_folder(model_id, kwargs.get("subfolder"), exc)
            if damaged is not None:
                raise damaged from exc
            raise
        finally:
            tuner.__dict__.get("_folder_for_live", {}).pop(adapter_name, None)
        model.base_model.__dict__.get("_never_loaded", set()).discard(adapter_name)  # (loaded: kept from now on)
        if live is not None:  # the live adapter now holds the folder's positions: its config says how they were drawn
            config = model.peft_config[adapter_name]
            config.method, config.seed, config.layers = live.method, live.seed, copy.deepcopy(live.layers)
        return result


def _folder_config(model_id, subfolder: str | None) -> ApetConfig | None:
    """The APET config of a local adapter folder (None: not a local folder, or not an APET one)."""
    folder = os.path.join(str(model_id), subfolder or "")
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return None
    try:
        config = ApetConfig.from_pretrained(folder)
    except Exception:
        return None  # (PEFT's own load names what is wrong with it)
    return config if isinstance(config, ApetConfig) else None


def _damaged_folder(model_id, subfolder: str | None, exc: BaseException) -> Exception | None:
    """PEFT's loader meets a local folder's damaged or missing tensor file as a safetensors error, or as a failed
    hub download of a repository id that is a path: the error that names the file instead (None: not that)."""
    folder = os.path.join(str(model_id), subfolder or "")
    if not os.path.isdir(folder):
        return None
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(weights) and not os.path.exists(os.path.join(folder, "adapter_model.bin")):
        return AdapterFileNotFoundError(f"{weights} is missing: {folder} holds no adapter tensors")
    if type(exc).__name__ == "SafetensorError":
        return AdapterFileError(f"{weights} is truncated or malformed: {exc}")
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return AdapterFileError(f"{os.path.join(folder, 'adapter_config.json')} is not valid JSON ({exc}); the adapter "
                                "folder is damaged")
    return None


def get_peft_model(model: nn.Module, config: ApetConfig, *args, calibration: Iterable | None = None,
                   loss_fn: Callable | None = None, **kwargs):
    """``peft.get_peft_model``, plus the calibration batches ``method="gradient"`` chooses positions from
    (``model(**batch).loss``, or ``loss_fn(model, batch)``)."""
    import peft
    token = _CALIBRATION.set((calibration, loss_fn))
    try:
        return peft.get_peft_model(model, config, *args, **kwargs)
    finally:
        _CALIBRATION.reset(token)
