"""Deprecated import path (0.3): the in-place entry point lives in apet_kernels.inplace now; this alias goes in 0.5."""

from .inplace.model import ApetModel  # noqa: F401
from .inplace.patching import get_apet_model, load_apet  # noqa: F401
from .inplace.state import _patch_of, is_patched  # noqa: F401
