"""Deprecated import path (0.3): the adapter registry lives in apet_kernels.adapters.registry now; this alias goes in
0.5."""

from .adapters.registry import AdapterRegistry, PeftAdapters, first_few  # noqa: F401
