"""Which APET layer wraps which weight: two wrappers over one weight (or over one weight's memory, shared between
two models) would both write W + S into it in the merged strategy, and neither could restore it."""

from __future__ import annotations

import weakref

import torch

from ..errors import ApetValueError
from ..zero3 import is_partitioned

# id(weight Parameter) -> (weak) the SparseDeltaLinear wrapping it. Two wrappers over one weight would
# both write it in the merged strategy and neither could restore it. Keyed by id, validated by identity on
# lookup: no weak reference to the tensor itself, which torch.utils.swap_tensors (the .to() of tensor
# subclasses such as torchao's quantized weights) refuses to swap.
_OWNERS: dict[int, weakref.ref] = {}


def _owner_of(weight: torch.Tensor):
    ref = _OWNERS.get(id(weight))
    owner = ref() if ref is not None else None
    return owner if owner is not None and owner.weight is weight else None


# the memory of each wrapped weight (its address) -> a layer over it: two models can share one weight's memory
# without sharing the Parameter (load_state_dict(..., assign=True) from one into the other), and a merged layer
# writes W + S there for both
_MEMORY: dict[int, weakref.ref] = {}


def _address(weight: torch.Tensor) -> int | None:
    if not isinstance(weight, torch.Tensor) or weight.is_meta or type(weight).__name__ == "DTensor" or \
            is_partitioned(weight):  # (ZeRO-3 gathers it into new memory at every forward)
        return None
    try:
        return weight.data_ptr() or None
    except RuntimeError:  # (a tensor subclass without storage)
        return None


def memory_owner(weight: torch.Tensor, other_than=None):
    """A live APET layer, other than ``other_than``, whose weight lies at the same memory as ``weight``."""
    address = _address(weight)
    ref = _MEMORY.get(address) if address is not None else None
    owner = ref() if ref is not None else None
    if owner is None or owner is other_than or _address(owner.weight) != address:
        return None
    return owner


def refuse_memory_of_a_merged_layer(weight: torch.Tensor, merged_here: bool, other_than=None) -> bool:
    """Whether ``weight``'s memory is another live layer's weight; refused where either of the two runs merged (one
    would write its W + S into the other's weight)."""
    owner = memory_owner(weight, other_than)
    if owner is not None and (owner._strategy.holds_sum or merged_here):
        raise ApetValueError("this weight's memory is also the weight of another model's APET layer (tensors shared "
                             "between two models, as load_state_dict(..., assign=True) from one into the other "
                             "makes them), and a merged layer writes W + S into it: give this model its own copy "
                             "(load a cloned state dict, or without assign=True), or run both with "
                             "strategy='unmerged'")
    return owner is not None


def claim(layer) -> None:
    """Record ``layer`` as the wrapper of its weight Parameter and of that weight's memory."""
    # the Parameter this layer merges into; another one at a forward means an engine re-gathers it (FSDP2)
    layer.__dict__["_own_weight"] = layer.base_layer._parameters.get("weight")
    key = id(layer.weight)

    def forget(ref, key=key):
        if _OWNERS.get(key) is ref:
            del _OWNERS[key]
    _OWNERS[key] = weakref.ref(layer, forget)
    address = _address(layer.weight)
    if address is not None:
        def forget_memory(ref, address=address):
            if _MEMORY.get(address) is ref:
                del _MEMORY[address]
        _MEMORY[address] = weakref.ref(layer, forget_memory)


def release(layer) -> None:
    """Forget that ``layer`` wraps its weight (after unloading), so it can be wrapped again."""
    if _owner_of(layer.weight) is layer:
        del _OWNERS[id(layer.weight)]
    if memory_owner(layer.weight) is layer:
        del _MEMORY[_address(layer.weight)]


def check_not_wrapped(weight: torch.Tensor) -> None:
    if _owner_of(weight) is not None:
        raise ApetValueError("this weight is already wrapped by another SparseDeltaLinear: two wrappers would write two "
                         "deltas into one weight and could not restore it (unload the first one, or wrap a copy)")
