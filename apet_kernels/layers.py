"""Deprecated import path (0.3): the layers live in apet_kernels.layer now; this alias goes in 0.5."""

from .layer import (DEFAULT_ADAPTER, STRATEGIES, DeltaSet, DenseMaskLinear, SparseDeltaLinear,  # noqa: F401
                    check_adapter_name, known_adapters)
