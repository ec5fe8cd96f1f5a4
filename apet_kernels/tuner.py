"""Deprecated import path (0.3): APET's PEFT tuner lives in apet_kernels.peft_method now; this alias goes in 0.5."""

from .peft_method.loading import get_peft_model  # noqa: F401
from .peft_method.tuner import ApetTuner  # noqa: F401
