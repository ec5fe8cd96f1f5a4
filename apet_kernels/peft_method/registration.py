"""APET's entry in PEFT's method registry, in one place.

PEFT's public ``register_peft_method`` accepts only members of its own ``PeftType`` enum, so APET enters the
three mappings that function fills (``peft.mapping``: config, tuner, prefix) under the string key ``"APET"``,
which is what ``ApetConfig.peft_type`` holds. These mappings are PEFT internals: tested with peft 0.21.0 and 0.21.2.
Saving and loading go through the tuner's ``_get_adapter_state_dict`` / ``_remap_adapter_state_dict_for_load``,
which PEFT calls since 0.21.0 (before, its state-dict code had one branch per built-in method). ``register``
refuses a PEFT without them; ``check_registration`` (run by the tests) names the cause if a release changes
the registry.
"""

from __future__ import annotations

from ..config import PEFT_TYPE, ApetConfig
from ..errors import ApetStateError
from .tuner import ApetTuner

_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def register() -> None:
    """Enter APET into PEFT's registry (idempotent)."""
    import peft.mapping as mapping
    from peft.tuners.tuners_utils import BaseTuner
    if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
        raise ApetStateError(f"peft {_peft_version()} saves and loads adapters without asking the method's tuner, so "
                             "APET cannot be a PEFT method there: install peft>=0.21")
    missing = [name for name in _MAPPINGS if not isinstance(getattr(mapping, name, None), dict)]
    if missing:
        raise ApetStateError(f"this PEFT ({_peft_version()}) has no {', '.join(missing)} in peft.mapping, where "
                             "apet_kernels registers APET as a PEFT method (tested with peft 0.21.0 and 0.21.2)")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = ApetConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = ApetTuner
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = ApetTuner.prefix


def check_registration() -> None:
    """Raise, naming what changed, unless PEFT's own lookups find APET."""
    import peft.mapping as mapping
    from peft.utils import save_and_load
    found = {name: getattr(mapping, name, {}).get(PEFT_TYPE) for name in _MAPPINGS}
    if found["PEFT_TYPE_TO_CONFIG_MAPPING"] is not ApetConfig or found["PEFT_TYPE_TO_TUNER_MAPPING"] is not ApetTuner:
        raise ApetStateError(f"PEFT {_peft_version()} does not find APET in peft.mapping after registration: {found}")
    used_by_saving = getattr(save_and_load, "PEFT_TYPE_TO_TUNER_MAPPING", None)
    if used_by_saving is not mapping.PEFT_TYPE_TO_TUNER_MAPPING:
        raise ApetStateError(f"PEFT {_peft_version()}'s state-dict code does not read peft.mapping's tuner mapping, "
                             "where APET is registered")


def _peft_version() -> str:
    import peft
    return getattr(peft, "__version__", "?")
