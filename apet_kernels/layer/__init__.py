"""The layer: SparseDeltaLinear (sparse APET over any linear-like base) and the dense-mask baseline; beside the
class, its adapters' state (``delta_set``), the state-dict rules, weight ownership, awaited positions and the
"auto" strategy's rule, each in its own module."""

from .construction import STRATEGIES
from .delta_set import DeltaSet
from .dense_mask import DenseMaskLinear
from .names import DEFAULT_ADAPTER, check_adapter_name, known_adapters
from .sparse_delta_linear import SparseDeltaLinear

__all__ = ["DEFAULT_ADAPTER", "DeltaSet", "DenseMaskLinear", "STRATEGIES", "SparseDeltaLinear", "check_adapter_name",
           "known_adapters"]
