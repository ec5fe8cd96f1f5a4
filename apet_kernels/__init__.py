"""apet-kernels: sparse-delta fine-tuning (APET) without dense masks, deltas or weight gradients."""

from .config import ApetConfig
from .functional import sparse_delta_linear
from .hf import ApetModel, get_apet_model, load_apet, replace_linears
from .layers import DenseMaskLinear, SparseDeltaLinear
from .ops.dispatch import backends
from .positions import GradientScores, Regrower, magnitude_indices
from .selection import select_indices, split_budget

__version__ = "0.1.0"

__all__ = ["ApetConfig", "ApetModel", "DenseMaskLinear", "GradientScores", "Regrower", "SparseDeltaLinear", "backends",
           "get_apet_model", "load_apet", "magnitude_indices", "replace_linears", "select_indices", "sparse_delta_linear", "split_budget",
           "__version__"]
