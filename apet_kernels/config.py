"""ApetConfig: what to tune and how. A ``peft.PeftConfig`` (``peft_type="APET"``): ``get_peft_model(model,
ApetConfig(...))`` builds APET through PEFT (apet_kernels.tuner), and ``get_apet_model`` patches in place."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from peft import PeftConfig

from ._checks import is_int, is_real
from .errors import AdapterFileError, ApetValueError
from .ops.dispatch import CHOICES
from .positions import CALIBRATION_SCORES
from .schemes import SCHEMES


def _check_module_spec(field_name: str, spec, none_ok: bool) -> None:
    """A regex matched against whole module names, or a list of names / name suffixes."""
    if spec is None and none_ok:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as exc:
            raise ApetValueError(f"{field_name} {spec!r} is not a valid regular expression: {exc}") from None
        return
    if not (isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec)):
        raise ApetValueError(f"{field_name} must be a regex string or a list of module names, got {spec!r}")


class _MethodName(str):
    """A string with an enum's ``.value``: code written for PEFT's ``PeftType`` members reads ``peft_type.value``
    (transformers' adapter integration), and PEFT's mappings and JSON files see the plain string."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:  # as an enum member prints: PEFT reads the name after the dot (get_model_status)
        return f"PeftType.{str.__str__(self)}"


PEFT_TYPE = _MethodName("APET")  # the key APET is registered under in PEFT (apet_kernels.peft_registry)


@dataclass
class ApetConfig(PeftConfig):
    """Budget (exactly one of ``num_params``, ``density``, ``budget_like``), targets and strategy.

    ``budget_like`` sets ``num_params`` to another PET method's parameter count on the same
    model, as the paper does: ``"lora:r=8"`` (on the same target modules), ``"bitfit"`` (all
    biases), ``"adapter:d=24"`` (two bottleneck adapters per layer), ``"prompt:n=100"``.
    ``method``: ``random`` (the paper's APET), ``rows``, ``cols``, ``blocks`` (seeded: an adapter
    stores the seed), ``magnitude`` (smallest |W|) or ``gradient`` (largest accumulated gradient over
    calibration batches given to get_apet_model); data-driven positions are stored in the adapter.
    ``target_modules``: ``"all-linear"`` (every nn.Linear / GPT-2 Conv1D except output heads),
    a list of module-name suffixes, or a regex matched against the full name.
    """

    num_params: int | None = None
    density: float | None = None
    budget_like: str | None = None
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    method: str = "random"
    seed: int = 0
    strategy: str = "auto"
    backend: str = "auto"  # runtime choice: not saved with the adapter
    modules_to_save: list[str] | None = None
    # PEFT's switch: True starts every adapter at zero (the model computes as its base); False draws small seeded
    # random values (N(0, 0.1^2), from the seed, the layer and the adapter name), for tests that need an adapter
    # that changes the output
    init_weights: bool = True
    # method="gradient": accumulate |g| ("abs") or g^2 ("squared", a diagonal Fisher) over the calibration
    # batches, keeping a candidate pool of pool_factor x K positions per layer (apet_kernels.positions)
    gradient_score: str = "abs"
    pool_factor: float = 4.0
    # method="gradient": at most ceil(row_cap * K / out) positions per row and ceil(col_cap * K / in) per column
    # of a layer (None: no cap); gradient positions otherwise cluster in a few rows and columns. gradient_score
    # also takes "signed" (|sum of g|), "snip" (|w| * sum |g|) and "xnorm" (sum of |g| / the input feature's norm)
    # and "corr" (sum of |g| / (the output gradient's norm x the input feature's norm): the |cosine| of the two)
    row_cap: float | None = None
    col_cap: float | None = None
    # filled by get_apet_model: per target layer its shape, k and an index checksum
    layers: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        given = [n for n in ("num_params", "density", "budget_like") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ApetValueError(f"ApetConfig needs exactly one of num_params, density, budget_like; got {given or 'none'}")
        if self.num_params is not None and (not is_int(self.num_params) or self.num_params < 0):
            raise ApetValueError(f"num_params must be a non-negative int, got {self.num_params!r}")
        if self.density is not None and not (is_real(self.density) and 0.0 <= float(self.density) <= 1.0):
            raise ApetValueError(f"density must be a number in [0, 1], got {self.density!r}")
        if self.budget_like is not None and not isinstance(self.budget_like, str):
            raise ApetValueError(f"budget_like must be a string such as 'lora:r=8', got {self.budget_like!r}")
        if not isinstance(self.init_weights, bool):
            raise ApetValueError(f"init_weights must be True (zeros) or False (small random values), got "
                                 f"{self.init_weights!r}")
        if not is_int(self.seed):
            raise ApetValueError(f"seed must be an int, got {self.seed!r}")
        # numpy's numbers are accepted; the file holds Python's (json writes no numpy scalar)
        self.seed = int(self.seed)
        self.num_params = None if self.num_params is None else int(self.num_params)
        self.density = None if self.density is None else float(self.density)
        if not (is_real(self.pool_factor) and math.isfinite(self.pool_factor) and self.pool_factor >= 1):
            raise ApetValueError(f"pool_factor must be a number >= 1 (candidates per tuned position), got "
                             f"{self.pool_factor!r}")
        _check_module_spec("target_modules", self.target_modules, none_ok=False)
        _check_module_spec("exclude_modules", self.exclude_modules, none_ok=True)
        if self.modules_to_save is not None and not (isinstance(self.modules_to_save, (list, tuple)) and
                                                     all(isinstance(n, str) for n in self.modules_to_save)):
            raise ApetValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.method not in SCHEMES:
            raise ApetValueError(f"unknown method {self.method!r}; choose one of {tuple(SCHEMES)}")
        if self.gradient_score not in CALIBRATION_SCORES:
            raise ApetValueError(f"unknown gradient_score {self.gradient_score!r}; choose one of {CALIBRATION_SCORES}")
        for name in ("row_cap", "col_cap"):
            cap = getattr(self, name)
            if cap is not None and not (is_real(cap) and math.isfinite(cap) and cap > 0):
                raise ApetValueError(f"{name} must be a positive number (positions per row or column, as a multiple of "
                                 f"K / out or K / in), got {cap!r}")
        self.pool_factor = float(self.pool_factor)
        self.row_cap, self.col_cap = (None if c is None else float(c) for c in (self.row_cap, self.col_cap))
        _check_layer_records(self.layers)
        if self.strategy not in ("auto", "merged", "unmerged", "dequantized"):
            raise ApetValueError(f"unknown strategy {self.strategy!r}")
        if self.backend not in CHOICES:
            raise ApetValueError(f"unknown backend {self.backend!r}; choose one of {CHOICES}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        del data["backend"]  # where kernels run is chosen at run time, not stored with an adapter
        saved = self.__dict__.get("layers_as_saved")
        if saved is not None:  # the records of the tensors just saved beside this file (apet_kernels.tuner)
            data["layers"] = copy.deepcopy(saved)
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's reader of adapter_config.json (``PeftModel.from_pretrained``, ``load_adapter``). A saved APET
        adapter always lists its layers (shapes, K, checksums, base fingerprints): without them its tensors could
        land on another model's positions unchecked."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, ApetConfig) and not config.layers:
            where = os.path.join(str(pretrained_model_name_or_path), subfolder or "", "adapter_config.json")
            raise AdapterFileError(f"{where} lists no layers (a saved APET adapter always does: a damaged or edited "
                                   "file?); nothing was loaded")
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.__dict__.pop("layers_as_saved", None)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "ApetConfig":
        if not isinstance(data, dict):
            raise ApetValueError(f"{where} must be a JSON object of config fields, got {type(data).__name__}")
        data = dict(data)
        data.pop("apet_format_version", None)
        data.pop("backend", None)  # written by versions before 0.2; a runtime choice
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ApetValueError(f"{where} has unknown keys {sorted(unknown)}")
        try:
            return cls(**data)
        except ApetValueError as exc:
            raise ApetValueError(f"{where}: {exc}") from None


def _check_layer_records(layers) -> None:
    """The per-layer records a config carries once patched or saved (shape, k, index checksum, base fingerprint),
    checked where the config is built, so that a damaged file is named here and not met later as a KeyError."""
    if not isinstance(layers, dict):
        raise ApetValueError(f"layers must map layer names to their records, got {type(layers).__name__}")
    for name, info in layers.items():
        where = f"layers[{name!r}]"
        if not isinstance(info, dict):
            raise ApetValueError(f"{where} must be a record with shape, k and checksum, got {info!r}")
        shape = info.get("shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
            raise ApetValueError(f"{where}['shape'] must be two positive ints (out, in), got {shape!r}")
        k, numel = info.get("k"), shape[0] * shape[1]
        if not (is_int(k) and 0 <= k <= numel):
            raise ApetValueError(f"{where}['k'] must be an int in [0, {numel}], got {k!r}")
        for key in ("checksum", "base_fingerprint", "base_quantization"):
            if (info.get(key) is not None or key == "checksum") and not isinstance(info.get(key), str):
                raise ApetValueError(f"{where}[{key!r}] must be a string, got {info.get(key)!r}")
        if info.get("positions", "seed") not in ("seed", "stored"):
            raise ApetValueError(f"{where}['positions'] must be 'seed' or 'stored', got {info.get('positions')!r}")
