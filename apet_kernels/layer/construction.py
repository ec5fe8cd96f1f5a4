"""What a SparseDeltaLinear checks before it wraps a layer: nothing changes until every check has passed."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_index_content, check_index_meta
from ..errors import ApetTypeError, ApetValueError
from ..linear_like import is_plain_linear, linear_shape, merge_is_legal
from ..ops.dispatch import CHOICES
from ..quantized import quantization_of
from ..tensor_parallel import tensor_parallel_block
from ..zero3 import full_shape
from .names import check_adapter_name
from .ownership import check_not_wrapped, refuse_memory_of_a_merged_layer

STRATEGIES = ("auto", "merged", "unmerged", "dequantized")


def check_wrappable(base_layer: nn.Module, indices: torch.Tensor, strategy: str, backend: str, weight_shared: bool,
                    adapter_name: str) -> tuple[torch.Tensor, bool, bool]:
    """(weight, quantized, merge legal) of a layer these arguments may wrap; raises, naming the problem, if not."""
    if getattr(base_layer, "_apet_layer", False):
        raise ApetTypeError("this module is already a SparseDeltaLinear: wrapping it again would merge a second "
                            "delta into the same weight (unmerge or unload the first one)")
    if strategy not in STRATEGIES:
        raise ApetValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if backend not in CHOICES:
        raise ApetValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")
    check_adapter_name(adapter_name)
    weight = getattr(base_layer, "weight", None)
    quantized = quantization_of(base_layer) is not None
    if not isinstance(weight, torch.Tensor) or (len(full_shape(weight)) != 2 and not quantized):
        raise ApetTypeError(f"{type(base_layer).__name__} has no 2-D .weight: not a linear layer")
    out_features, in_features = linear_shape(base_layer)
    numel = out_features * in_features
    check_index_meta(indices, numel)
    check_index_content(indices, numel)
    check_not_wrapped(weight)
    shared_memory = refuse_memory_of_a_merged_layer(weight, strategy == "merged")
    if tensor_parallel_block(base_layer) is not None:
        _check_tensor_parallel(base_layer, strategy)
        legal, why = True, ""  # (each rank keeps its own deltas in its own shard: apet_kernels.tensor_parallel)
    else:
        legal, why = merge_is_legal(base_layer, weight_shared or shared_memory)
    if strategy == "merged" and not legal:
        raise ApetValueError(f"strategy 'merged' is not legal here: {why}")
    if strategy == "dequantized" and not quantized:
        raise ApetValueError("strategy 'dequantized' scatters the deltas into a quantized base's dequantized weight, "
                         "and this layer's weight is not quantized (use 'merged' or 'auto')")
    return weight, quantized, legal


def _check_tensor_parallel(base_layer: nn.Module, strategy: str) -> None:
    """Tensor parallelism runs merged: each rank writes its own deltas into its own shard, and the engine's GEMMs and
    collectives do the rest (an unmerged term would need its own collectives, which are not built)."""
    if type(base_layer) is not nn.Linear or not is_plain_linear(base_layer):
        raise ApetTypeError(f"a tensor-parallel {type(base_layer).__name__}: APET supports tensor parallelism on "
                            "nn.Linear layers (ColwiseParallel, RowwiseParallel)")
    if strategy not in ("auto", "merged"):
        raise ApetValueError(f"strategy {strategy!r} under tensor parallelism: each rank keeps its own deltas in its "
                             "own shard of the weight, which is the merged strategy; use strategy 'auto' or 'merged'")
