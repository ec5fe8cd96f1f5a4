"""The in-place entry point: ``get_apet_model`` and ``load_apet`` patch a model in place; ``ApetModel`` is the mixin
its class gets. Built on apet_kernels.adapters, beside the PEFT method (apet_kernels.peft_method)."""

from .model import ApetModel
from .patching import get_apet_model, load_apet
from .state import is_patched

__all__ = ["ApetModel", "get_apet_model", "is_patched", "load_apet"]
