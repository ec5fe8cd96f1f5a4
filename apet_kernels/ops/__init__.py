"""The sparse-delta op set (sddmm, spmm, spmm_t, scatter_merge) and its backends."""

from .dispatch import BACKENDS, backends, resolve  # noqa: F401
from .layout import DeltaLayout, build_layout  # noqa: F401
