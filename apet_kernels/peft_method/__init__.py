"""APET as a PEFT method: ``ApetTuner`` (PEFT's model role for ``ApetConfig``, as ``LoraModel`` is LoRA's), its
loading rules, and its entry in PEFT's registry. Built on apet_kernels.adapters; it never imports the in-place entry
point."""

from .loading import get_peft_model
from .registration import check_registration, register
from .tuner import ApetTuner

__all__ = ["ApetTuner", "check_registration", "get_peft_model", "register"]
