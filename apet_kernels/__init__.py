"""apet-kernels: sparse-delta fine-tuning (APET) without dense masks, deltas or weight gradients."""

from .config import ApetConfig
from .errors import (AdapterFileError, AdapterFileNotFoundError, ApetError, ApetStateError, ApetTypeError,
                     ApetValueError, BaseMismatchError, StateDictError)
from .functional import sparse_delta_linear
from .layer import DeltaSet, DenseMaskLinear, SparseDeltaLinear
from .learning_rate import suggested_lr
from .inplace import ApetModel, get_apet_model, load_apet
from .peft_method import ApetTuner, get_peft_model
from .peft_method import register as _register_with_peft
from .ops.dispatch import backends
from .positions import GradientScores, Regrower
from .selection import magnitude_indices, select_indices, split_budget
from .targets import replace_linears

__version__ = "0.3.0"

_register_with_peft()  # get_peft_model(model, ApetConfig(...)) and PeftModel.from_pretrained find APET

__all__ = ["AdapterFileError", "AdapterFileNotFoundError", "ApetConfig", "ApetError", "ApetModel", "ApetStateError",
           "ApetTuner", "ApetTypeError", "ApetValueError", "BaseMismatchError", "DeltaSet", "DenseMaskLinear",
           "GradientScores", "Regrower", "SparseDeltaLinear", "backends", "get_apet_model", "get_peft_model", "load_apet",
           "magnitude_indices", "replace_linears", "select_indices", "sparse_delta_linear", "split_budget",
           "StateDictError", "suggested_lr", "__version__"]
