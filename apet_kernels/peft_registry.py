"""Deprecated import path (0.3): APET's entry in PEFT's registry lives in apet_kernels.peft_method.registration now;
this alias goes in 0.5."""

from .peft_method.registration import check_registration, register  # noqa: F401
