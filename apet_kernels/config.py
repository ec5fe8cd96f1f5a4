"""ApetConfig: what to tune and how, saved as JSON next to an adapter (PEFT's config role)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .ops.dispatch import CHOICES
from .positions import SCORES
from .selection import DATA_METHODS, METHODS

CONFIG_NAME = "apet_config.json"
# format 2 (0.3): the tensors of every adapter under the patched model's own state-dict keys, in the file
# transformers' Trainer loads when it resumes or loads the best checkpoint of a PreTrainedModel
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"  # format 1 (0.1/0.2): one adapter, keys <layer>.delta_values
FORMAT_VERSION = 2


@dataclass
class ApetConfig:
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
    # method="gradient": accumulate |g| ("abs") or g^2 ("squared", a diagonal Fisher) over the calibration
    # batches, keeping a candidate pool of pool_factor x K positions per layer (apet_kernels.positions)
    gradient_score: str = "abs"
    pool_factor: float = 4.0
    # filled by get_apet_model: per target layer its shape, k and an index checksum
    layers: dict = field(default_factory=dict)

    def __post_init__(self):
        given = [n for n in ("num_params", "density", "budget_like") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"ApetConfig needs exactly one of num_params, density, budget_like; got {given or 'none'}")
        if self.num_params is not None and (not isinstance(self.num_params, int) or self.num_params < 0):
            raise ValueError(f"num_params must be a non-negative int, got {self.num_params!r}")
        if self.density is not None and not 0.0 <= float(self.density) <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {self.density}")
        if self.method not in METHODS + DATA_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS + DATA_METHODS}")
        if self.gradient_score not in SCORES:
            raise ValueError(f"unknown gradient_score {self.gradient_score!r}; choose one of {SCORES}")
        if self.strategy not in ("auto", "merged", "unmerged"):
            raise ValueError(f"unknown strategy {self.strategy!r}")
        if self.backend not in CHOICES:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {CHOICES}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        del data["backend"]  # where kernels run is chosen at run time, not stored with an adapter
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "ApetConfig":
        data = dict(data)
        data.pop("apet_format_version", None)
        data.pop("backend", None)  # written by versions before 0.2; a runtime choice
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        return cls(**data)

    def save_pretrained(self, directory: str, adapter_name: str = "default") -> None:
        """apet_config.json holding this one adapter (what ``ApetModel.save_pretrained`` writes for several)."""
        write_config_file(directory, {adapter_name: self}, [adapter_name])

    @classmethod
    def from_pretrained(cls, directory: str, adapter_name: str | None = None) -> "ApetConfig":
        """The config of ``adapter_name`` (default: the folder's active adapter) in an APET folder."""
        configs, active = read_config_file(directory)
        name = adapter_name or active[0]
        if name not in configs:
            raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} has no adapter {name!r} (it has {sorted(configs)})")
        return configs[name]


def write_config_file(directory: str, configs: dict[str, ApetConfig], active: list[str]) -> None:
    """apet_config.json, format 2: ``{"apet_format_version": 2, "active_adapters": [...], "adapters": {name:
    config}}`` (format 1 held one config's fields at the top level)."""
    os.makedirs(directory, exist_ok=True)
    data = {"apet_format_version": FORMAT_VERSION, "active_adapters": list(active),
            "adapters": {name: config.to_dict() for name, config in configs.items()}}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def read_config_file(directory: str) -> tuple[dict[str, ApetConfig], list[str]]:
    """(adapter name -> config, active adapter names) of an APET folder of format 1 or 2."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not an APET adapter folder") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged") from None
    version = data.get("apet_format_version") if isinstance(data, dict) else None
    if version == 1:
        return {"default": ApetConfig.from_dict(data, path)}, ["default"]
    if version != FORMAT_VERSION or not isinstance(data.get("adapters"), dict) or not data["adapters"]:
        raise ValueError(f"{path} is not an apet-kernels config of format version 1 or {FORMAT_VERSION}")
    configs = {name: ApetConfig.from_dict(cfg, f"{path} (adapter {name!r})") for name, cfg in data["adapters"].items()}
    active = list(data.get("active_adapters") or [next(iter(configs))])
    if any(name not in configs for name in active):
        raise ValueError(f"{path}: active_adapters {active} are not all among its adapters {sorted(configs)}")
    return configs, active
