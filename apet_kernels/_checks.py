"""Input checks shared by the functional API, the modules and the adapter loader.

Metadata checks (dtype, shape, device) are free and always run. Content checks
(range, order, duplicates) read the indices, which on a GPU means a host sync,
so they run when a module is built or loaded, for CPU tensors, or on request
(``validate=True`` or ``APET_VALIDATE=1``) -- never on every GPU forward.
"""

from __future__ import annotations

import numbers
import os

import torch
from .errors import ApetTypeError, ApetValueError

_INDEX_DTYPES = (torch.int32, torch.int64)


def is_int(v) -> bool:
    """An integer argument: Python's or numpy's ints, not bools (True would pass as 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real-number argument, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validation_from_env() -> bool:
    """APET_VALIDATE=1: check index content on every call, modules included, on every backend."""
    return os.environ.get("APET_VALIDATE", "") not in ("", "0")


def validate_requested(validate: bool | None, *tensors: torch.Tensor) -> bool:
    if validate is not None:
        return bool(validate)
    if validation_from_env():
        return True
    return all(t.device.type == "cpu" for t in tensors)


def check_index_meta(indices: torch.Tensor, numel: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise ApetTypeError(f"delta indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ApetTypeError(f"delta indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ApetValueError(f"delta indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.dtype == torch.int32 and numel > 2**31:
        raise ApetTypeError(f"int32 delta indices cannot address a weight of {numel} elements; use int64")


def check_index_content(indices: torch.Tensor, numel: int) -> None:
    """Range, order and uniqueness. Reads the indices (a host sync on a GPU)."""
    if indices.numel() == 0:
        return
    idx = indices.detach().to("cpu", torch.int64)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        bad = int(torch.nonzero((idx < 0) | (idx >= numel))[0])
        raise ApetValueError(f"delta index out of range: indices[{bad}] = {int(idx[bad])}, "
                         f"but the weight has {numel} elements (valid: 0..{numel - 1})")
    steps = idx[1:] - idx[:-1]
    if idx.numel() > 1 and bool((steps <= 0).any()):
        bad = int(torch.nonzero(steps <= 0)[0]) + 1
        what = "duplicate" if int(steps[bad - 1]) == 0 else "unsorted"
        raise ApetValueError(f"delta indices must be sorted and unique: {what} at indices[{bad}] = "
                         f"{int(idx[bad])} after indices[{bad - 1}] = {int(idx[bad - 1])}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int(torch.nonzero(~torch.isfinite(t.detach().reshape(-1)))[0])
        raise ApetValueError(f"{name} holds NaN or Inf (first at flat position {bad}: {t.reshape(-1)[bad].item()})")


def check_values(values: torch.Tensor, indices: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor):
        raise ApetTypeError(f"delta values must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise ApetTypeError(f"delta values must be floating point, got {values.dtype}")
    if values.dim() != 1 or values.numel() != indices.numel():
        raise ApetValueError(f"delta values have shape {tuple(values.shape)} but there are "
                         f"{indices.numel()} indices; expected shape ({indices.numel()},)")


def check_linear_inputs(x, weight, bias, values, indices) -> None:
    if weight.dim() != 2:
        raise ApetValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ApetValueError(f"x has last dimension {x.shape[-1]}, but the weight expects "
                         f"in_features={in_features} (weight shape {tuple(weight.shape)})")
    if not x.is_floating_point() or x.dtype != weight.dtype:
        raise ApetTypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    check_index_meta(indices, weight.numel())
    check_values(values, indices)
    tensors = {"x": x, "weight": weight, "values": values, "indices": indices}
    if bias is not None:
        if bias.shape != (out_features,):
            raise ApetValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ApetValueError(f"all tensors must be on one device, got {listing}")
