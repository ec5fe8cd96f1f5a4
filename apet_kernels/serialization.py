"""The APET folder format: the compatibility contract between versions. Reading, checking and writing;
nothing here touches a model.

Format 2 (written since 0.3): ``apet_config.json`` (``write_config_file``: every adapter's config and
per-layer record) and ``model.safetensors``, whose keys are the patched model's own state-dict keys:
``<layer>.deltas.<adapter>.values`` (fp32), ``<layer>.deltas.<adapter>.indices`` (only where a seed does
not regenerate them) and the parameters of ``modules_to_save``. A Trainer checkpoint is such a folder,
which is why the file has the name transformers' Trainer loads (``load_state_dict(..., strict=False)``)
when it resumes or loads the best checkpoint.

Beside them, the same adapters in PEFT's layout (``peft_layout``): ``adapter_config.json`` and
``adapter_model.safetensors`` for the adapter named "default" (else the first active one), the others in
subfolders named after them, under PEFT's keys (``base_model.model.<layer>.deltas.values``, ``.indices``).
That is what ``PeftModel.save_pretrained`` writes for APET (apet_kernels.tuner), so a folder saved in place
loads through PEFT (``PeftModel.from_pretrained``, Trainer's PeftModel paths) and a PEFT folder loads in place
(``read_folder`` reads that layout when there is no ``apet_config.json``). The two file pairs exist because
transformers' Trainer resumes a PreTrainedModel from ``model.safetensors`` and a PeftModel from
``adapter_model.safetensors``; each holds a few bytes per tuned parameter.

Format 1 (0.1/0.2, read only): one adapter, ``adapter_model.safetensors`` with ``<layer>.delta_values``,
``<layer>.delta_indices`` and modules_to_save parameters, its config's fields at the JSON's top level.

Per layer the config records the shape, K, an index checksum and a fingerprint and sketch of the base
weights at the tuned positions, so a folder loaded onto another base (or a re-quantized copy of it) is
recognized before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field

import torch

from ._checks import check_finite
from .config import ApetConfig
from .errors import AdapterFileError, AdapterFileNotFoundError
from .schemes import is_seeded
from .selection import index_checksum  # noqa: F401 (index_checksum: part of this API)

CONFIG_NAME = "apet_config.json"
# PEFT's layout of the same adapters (apet_kernels.tuner, PeftModel.save_pretrained): the adapter named "default"
# (else the first active one) at the top, each other one in a subfolder of its name; keys base_model.model.<layer>
# .deltas.values / .indices and base_model.model.<modules_to_save parameter>
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# format 2 (0.3): the tensors of every adapter under the patched model's own state-dict keys, in the file
# transformers' Trainer loads when it resumes or loads the best checkpoint of a PreTrainedModel
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"  # format 1 (0.1/0.2): one adapter, keys <layer>.delta_values
FORMAT_VERSION = 2

VALUES, INDICES = "values", "indices"


def base_fingerprint(base: torch.Tensor) -> str:
    """A hash of the base weights at the tuned positions (K values, as fp32: the same for an fp32,
    bf16 or fp16 copy of a bf16 model). An adapter stores it to recognize the base it was trained on."""
    return hashlib.sha256(base.detach().to("cpu", torch.float32).numpy().tobytes()).hexdigest()[:16]


SKETCH_SIZE = 8  # projections in a base sketch
SKETCH_QUANTIZATION_ONLY = 0.5  # sketch distance under which two bases differ only by quantization


def base_sketch(base: torch.Tensor) -> list[float]:
    """8 fixed random +-1 projections of the K base values, / sqrt(K): unlike the fingerprint, close
    (not equal) for a quantized copy of the same base, and far apart (distance ~1) for another base.
    Not the weights: 8 numbers cannot give back K > 8 values."""
    v = base.detach().to("cpu", torch.float32).reshape(-1)
    signs = torch.randint(0, 2, (SKETCH_SIZE, v.numel()), generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    return [round(float(x), 7) for x in signs @ v / max(v.numel(), 1) ** 0.5]


def sketch_distance(a: list[float], b: list[float]) -> float:
    a, b = torch.tensor(a), torch.tensor(b)
    return float((a - b).norm() / torch.maximum(a.norm(), b.norm()).clamp_min(1e-30))


def write_config_file(directory: str, configs: dict[str, ApetConfig], active: list[str]) -> None:
    """apet_config.json, format 2: ``{"apet_format_version": 2, "active_adapters": [...], "adapters": {name:
    config}}`` (format 1 held one config's fields at the top level)."""
    os.makedirs(directory, exist_ok=True)
    data = {"apet_format_version": FORMAT_VERSION, "active_adapters": list(active),
            "adapters": {name: config.to_dict() for name, config in configs.items()}}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(data, f, indent=2)  # (adapters in the order added: the first one patched the model)


def peft_layout(configs: dict[str, ApetConfig], active: list[str], tensors: dict[str, torch.Tensor]
                ) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """The same adapters in PEFT's layout: subfolder ("" for the top) -> (adapter_config.json's content, tensors
    under PEFT's keys), so that ``PeftModel.from_pretrained`` reads a folder ``get_apet_model``'s model saved."""
    top = "default" if "default" in configs else active[0]
    out, claimed = {}, set()
    for name, config in configs.items():
        own = {}
        for layer in config.layers:
            for what in (VALUES, INDICES):
                key = delta_key(layer, name, what)
                if key in tensors:
                    own[f"{PEFT_PREFIX}{layer}.deltas.{what}"] = tensors[key]
                    claimed.add(key)
        data = config.to_dict()
        data.update(peft_type=config.peft_type.value, inference_mode=True)
        out["" if name == top else name] = (data, own)
    others = {k: t for k, t in tensors.items() if k not in claimed}
    if others:  # modules_to_save: the model's, saved once, with the top adapter as PEFT saves them
        out[""][1].update({PEFT_PREFIX + k: t for k, t in others.items()})
        out[""][0]["modules_to_save"] = next((c.modules_to_save for c in configs.values() if c.modules_to_save), None)
    return out


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing or damaged file raises naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise AdapterFileNotFoundError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} is truncated or malformed: {exc}") from None


def _read_peft_layout(directory: str) -> tuple[dict[str, ApetConfig], list[str], dict[str, torch.Tensor], str]:
    """The adapter at the top of a folder in PEFT's layout (``PeftModel.save_pretrained``), as
    ``PeftModel.from_pretrained`` reads it: its config and tensors under the keys a patched model uses
    (``<layer>.deltas.default.values``). Subfolders (further adapters of a PEFT save, or left by an earlier save
    into the same folder) are not read: load them by their own path."""
    config_path = os.path.join(directory, PEFT_CONFIG_NAME)
    try:
        with open(config_path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON ({exc}); the adapter folder is damaged") from None
    if not isinstance(data, dict) or data.get("peft_type") != "APET":
        kind = data.get("peft_type") if isinstance(data, dict) else None
        raise AdapterFileError(f"{config_path} is a PEFT adapter of type {kind!r}, not an APET adapter")
    configs = {"default": ApetConfig.from_dict(data, config_path)}
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not os.path.exists(weights) and os.path.exists(os.path.join(directory, "adapter_model.bin")):
        raise AdapterFileError(f"{directory} holds adapter_model.bin (PEFT's save_pretrained(safe_serialization=False)): "
                               "apet_kernels reads safetensors only (nothing is unpickled); load it with "
                               "PeftModel.from_pretrained, or save it again with safe_serialization=True")
    tensors = {}
    for key, t in _load_tensors(weights).items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFileError(f"{weights}: {key} is not a PEFT adapter key (base_model.model.<module>...)")
        key = key[len(PEFT_PREFIX):]
        layer, _, what = key.rpartition(".deltas.")
        tensors[delta_key(layer, "default", what) if layer and what in (VALUES, INDICES) else key] = t
    return configs, ["default"], tensors, weights


def _layouts_conflict(directory: str, configs: dict[str, ApetConfig], active: list[str],
                      tensors: dict[str, torch.Tensor]) -> str | None:
    """A folder holding both layouts holds one save (``save_pretrained`` of a model patched in place writes both)
    unless PEFT saved another adapter over an older in-place save: then the two disagree, and which one the
    caller means cannot be told."""
    if not os.path.exists(os.path.join(directory, PEFT_CONFIG_NAME)):
        return None
    top = "default" if "default" in configs else active[0]
    try:
        _, _, peft_tensors, _ = _read_peft_layout(directory)
    except (AdapterFileError, ValueError) as exc:
        return f"{directory} holds a damaged {PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} beside {CONFIG_NAME}: {exc}"
    mine = {k.replace(f".deltas.{top}.", ".deltas.default."): t for k, t in tensors.items()
            if f".deltas.{top}." in k}
    theirs = {k: t for k, t in peft_tensors.items() if ".deltas.default." in k}
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        return (f"{directory} holds two different adapters: {CONFIG_NAME} + {WEIGHTS_NAME} (saved by a model patched "
                f"in place) and {PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} (saved by a PeftModel over it?), which "
                "disagree; remove the stale pair or save into an empty folder. Nothing was loaded")
    return None


def read_config_file(directory: str) -> tuple[dict[str, ApetConfig], list[str]]:
    """(adapter name -> config, active adapter names) of an APET folder of format 1 or 2."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AdapterFileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not an APET adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged") from None
    version = data.get("apet_format_version") if isinstance(data, dict) else None
    if version == 1:
        return {"default": ApetConfig.from_dict(data, path)}, ["default"]
    if version != FORMAT_VERSION or not isinstance(data.get("adapters"), dict) or not data["adapters"]:
        raise AdapterFileError(f"{path} is not an apet-kernels config of format version 1 or {FORMAT_VERSION}")
    configs = {name: ApetConfig.from_dict(cfg, f"{path} (adapter {name!r})") for name, cfg in data["adapters"].items()}
    active = data.get("active_adapters") or [next(iter(configs))]
    if not isinstance(active, list) or len(set(map(str, active))) != len(active):
        raise AdapterFileError(f"{path}: active_adapters must be a list of distinct adapter names, got {active!r}")
    if any(name not in configs for name in active):
        raise AdapterFileError(f"{path}: active_adapters {active} are not all among its adapters {sorted(configs)}")
    return configs, active


def delta_key(layer: str, adapter: str, what: str) -> str:
    return f"{layer}.deltas.{adapter}.{what}"


def regenerable(config: ApetConfig, layer: str, indices: torch.Tensor) -> bool:
    """Seeded positions that never moved (no regrowth): the folder stores the seed, not the indices."""
    info = config.layers.get(layer, {})
    return is_seeded(config.method) and info.get("checksum") == index_checksum(indices) and \
        info.get("positions") != "stored"


@dataclass
class SavedAdapter:
    """One adapter as a folder holds it: its config and, per layer, stored indices (or None) and values."""
    config: ApetConfig
    indices: dict[str, torch.Tensor | None] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SavedFolder:
    adapters: dict[str, SavedAdapter]  # in the folder's order
    active: list[str]
    others: dict[str, torch.Tensor]  # modules_to_save parameters, by their name in the model
    path: str  # the tensor file, for messages
    conflict: str | None = None  # why this folder's two layouts disagree (raised by check_one_save)

    def check_one_save(self) -> None:
        """Refuse a folder whose two layouts hold different adapters. Loaders call this after their own checks
        against the model, so a damaged file is named for its damage first."""
        if self.conflict:
            raise AdapterFileError(self.conflict)


def read_folder(directory: str) -> SavedFolder:
    """Everything an APET folder of format 1 or 2 holds, checked for damage and completeness (not yet
    against a model): every adapter layer has float values of its K and, where stored, indices."""

    directory = str(directory)
    if not os.path.isdir(directory):
        raise AdapterFileNotFoundError(f"{directory!r} is not a folder (an APET adapter is a folder: "
                                       f"{CONFIG_NAME} + {WEIGHTS_NAME}, or PEFT's {PEFT_CONFIG_NAME} + "
                                       f"{PEFT_WEIGHTS_NAME})")
    legacy = False
    if not os.path.exists(os.path.join(directory, CONFIG_NAME)) and \
            os.path.exists(os.path.join(directory, PEFT_CONFIG_NAME)):
        configs, active, tensors, path = _read_peft_layout(directory)
    else:
        configs, active = read_config_file(directory)
        legacy = not os.path.exists(os.path.join(directory, WEIGHTS_NAME)) and \
            os.path.exists(os.path.join(directory, LEGACY_WEIGHTS_NAME))
        path = os.path.join(directory, LEGACY_WEIGHTS_NAME if legacy else WEIGHTS_NAME)
        tensors = _load_tensors(path)
    for key, t in tensors.items():
        check_finite(t, f"{path}: {key}")
    conflict = _layouts_conflict(directory, configs, active, tensors) if os.path.basename(path) == WEIGHTS_NAME \
        else None
    adapters, claimed = {}, set()
    for name, config in configs.items():
        if not config.layers:
            raise AdapterFileError(f"adapter {name!r} in {directory} lists no layers (a saved APET adapter always does: "
                                   "a damaged or edited config file?); nothing was loaded")
        saved = adapters[name] = SavedAdapter(config)
        for layer, info in config.layers.items():
            vkey = f"{layer}.delta_values" if legacy else delta_key(layer, name, VALUES)
            ikey = f"{layer}.delta_indices" if legacy else delta_key(layer, name, INDICES)
            values = tensors.get(vkey)
            if values is None or tuple(values.shape) != (int(info["k"]),) or not values.is_floating_point():
                raise AdapterFileError(f"{path}: {vkey} is missing or not a float tensor of shape ({int(info['k'])},)")
            saved.values[layer] = values
            saved.indices[layer] = tensors.get(ikey)
            claimed.update({vkey, ikey})
    others = {k: t for k, t in tensors.items() if k not in claimed}
    return SavedFolder(adapters, active, others, path, conflict)


def _refuse_overwriting_a_model(directory: str) -> None:
    """A folder holding a model's own model.safetensors (a base model saved there, not an APET adapter) is not
    written into: the adapter's file of that name would replace the model's weights."""
    from safetensors import SafetensorError, safe_open
    path = os.path.join(str(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    try:
        with safe_open(path, framework="pt") as f:
            mark = (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return  # a damaged file of ours (or anything unreadable): replaced, as a failed save's would be
    if mark != "apet":
        raise AdapterFileError(f"{path} holds a model's weights (not an APET adapter, whose file says format=apet): "
                               "saving the adapter there would overwrite them. Save it to another folder; nothing "
                               "was written")


def write_folder(directory: str, configs: dict[str, ApetConfig], active: list[str],
                 tensors: dict[str, torch.Tensor]) -> None:
    """Both files appear together or not at all: written to a temporary folder beside ``directory`` and moved
    into place (into an existing folder, such as a Trainer checkpoint, file by file). Never pickles."""
    from safetensors.torch import save_file
    _refuse_overwriting_a_model(directory)
    for key, t in tensors.items():
        check_finite(t, f"adapter tensor {key}")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    directory = os.path.abspath(str(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory)}.saving-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)  # (not mkdtemp: its 0700 would become the adapter folder's permissions)
    try:
        write_config_file(staging, configs, active)
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "apet"})
        written = [WEIGHTS_NAME, CONFIG_NAME]
        for sub, (data, own) in peft_layout(configs, active, tensors).items():
            os.makedirs(os.path.join(staging, sub), exist_ok=True)
            save_file(own, os.path.join(staging, sub, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
            with open(os.path.join(staging, sub, PEFT_CONFIG_NAME), "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            written += [os.path.join(sub, PEFT_WEIGHTS_NAME), os.path.join(sub, PEFT_CONFIG_NAME)]
        if not os.path.exists(directory):
            os.rename(staging, directory)  # one atomic step
            return
        for name in written:  # into an existing folder (a Trainer checkpoint): file by file
            os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
