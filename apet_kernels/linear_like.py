"""What counts as a linear layer here, and its weight seen as (out, in). A leaf module: everything
that handles layers imports it, it imports nothing of the package but ``quantized``."""

from __future__ import annotations

import torch
import torch.nn as nn

from .quantized import dims as quantized_dims
from .quantized import quantization_of
from .zero3 import full_shape


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and its subclasses: quantized linears) or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_plain_linear(module: nn.Module) -> bool:
    """A layer whose forward is exactly x W^T + b on its ``.weight``: nn.Linear itself or Conv1D."""
    return type(module) is nn.Linear or is_conv1d(module)


def runs_as_plain_gemm(module: nn.Module, x: torch.Tensor) -> bool:
    """True when calling ``module(x)`` is exactly ``F.linear(x, W, b)`` on its own frozen, unsharded Parameter
    in x's dtype: no hooks (FSDP's gathers, users' hooks), no autocast, no computed or trainable weight."""
    w = module._parameters.get("weight")
    if x.device.type == "meta":  # (torch has no autocast state for meta tensors)
        return False
    return (is_plain_linear(module) and w is not None and type(w.data) is torch.Tensor and not w.requires_grad
            and w.dtype == x.dtype and w.device == x.device and not torch.is_autocast_enabled(x.device.type)
            and "forward" not in module.__dict__  # (accelerate's offloading hooks replace the instance's forward)
            and not (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                     or nn.modules.module._global_forward_pre_hooks))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module; GPT-2's Conv1D stores its weight as (in, out);
    a quantized weight may be packed (bitsandbytes 4-bit: (n, 1) bytes)."""
    if quantization_of(module) is not None:
        return quantized_dims(module)
    shape = full_shape(module.weight)  # (ZeRO-3 keeps a slice: its .data is empty between gathers)
    return (shape[1], shape[0]) if is_conv1d(module) else (shape[0], shape[1])


def weight_oi(module: nn.Module) -> torch.Tensor:
    """A float linear-like module's weight as (out, in): a view (transposed for GPT-2's Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def weight_is_computed(module: nn.Module) -> bool:
    """True when ``module.weight`` is computed from other tensors at every forward (torch.nn.utils.prune's
    weight_orig * weight_mask, a parametrization such as weight_norm) instead of being a Parameter."""
    return "weight" not in module._parameters


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The Parameter a linear layer's weight comes from: ``weight`` itself, pruning's ``weight_orig`` or a
    parametrization's ``original``."""
    if "weight" in module._parameters:
        return module._parameters["weight"]
    if "weight_orig" in module._parameters:
        return module._parameters["weight_orig"]
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations and \
            hasattr(parametrizations["weight"], "original"):
        return parametrizations["weight"].original
    return module.weight  # (computed from several tensors, as weight_norm's g and v: readable, never written)


def merge_is_legal(base_layer: nn.Module, shared: bool = False) -> tuple[bool, str]:
    """Merged writes W's storage and relies on the layer computing x W^T + b from it: only plain
    nn.Linear / Conv1D layers with a floating, unquantized, unsharded weight that no other module uses."""
    quant = quantization_of(base_layer)
    if quant is not None:
        return False, (f"the weight is quantized ({quant}): merging would write its quantized storage; "
                       f"strategy 'dequantized' (what 'auto' picks) scatters the deltas into the weight each GEMM "
                       f"dequantizes, and merge_and_unload() dequantizes the layer and adds them")
    if weight_is_computed(base_layer):
        return False, ("the weight is computed from other tensors at every forward (pruning or a parametrization): "
                       "a write into it would not last")
    if not is_plain_linear(base_layer):
        return False, (f"the base layer is a {type(base_layer).__name__}, not a plain nn.Linear or Conv1D "
                       f"(its forward may not be x W^T + b on .weight)")
    weight = base_layer.weight
    if not weight.is_floating_point():
        return False, f"weight dtype {weight.dtype} is not floating point (quantized?)"
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        return False, ("the weight is already sharded (a DTensor: FSDP2's fully_shard, or transformers' "
                       "DistributedConfig at from_pretrained), and W + S cannot be kept in shards that are gathered "
                       "anew at every forward: patch before sharding to run merged (fully_shard after get_peft_model, "
                       "or Trainer's fsdp_config), or use strategy 'auto' or 'unmerged'")
    if shared:
        return False, "weight is shared with another module (tied, or another model's APET layer over its memory)"
    return True, ""
