"""APET adapters served per request through vLLM's own LoRA machinery (``LoRARequest``, ``--lora-modules``, slots,
its LRU cache). Imported by the plugin (apet_kernels.serving.vllm_plugin) only where vLLM is the version it was
tested with: the names patched here are vLLM's private ones.

- Loading: an APET folder (PEFT's layout or the in-place one) becomes an ``ApetLoRAModel``: no low-rank weights
  (the slot's LoRA stays zero) and, per vLLM module, the deltas placed in that module's weight: a packed module
  (``qkv_proj``, ``gate_up_proj``) gets each of its Hugging Face layers' deltas at that layer's row offset. Seeded
  positions are regenerated, and each layer's base fingerprint is checked against the weights vLLM loaded.
- Activation puts each module's deltas in the slot vLLM chose; deactivation takes them out.
- The forward adds, after vLLM's own LoRA term, each token's slot's S x (apet_kernels.serving.vllm_slots); base
  requests (slot -1) get nothing.
"""

from __future__ import annotations

import json
import os

import torch
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.utils import get_adapter_absolute_path
from vllm.lora.worker_manager import WorkerLoRAManager

from ..errors import ApetValueError, BaseMismatchError
from .sparse_adapter import LayerDeltas, checkpoint_values, read_sparse_adapter
from .vllm_slots import ModuleDeltas, ModuleSlots, slot_capacity

SLOTS = "_apet_slots"  # a vLLM LoRA layer's ModuleSlots


def is_apet_folder(path: str) -> bool:
    """Whether a local adapter folder holds an APET adapter (either entry point's layout), not a LoRA one."""
    if os.path.exists(os.path.join(path, "apet_config.json")):
        return True
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f).get("peft_type") == "APET"
    except (OSError, ValueError, AttributeError):
        return False


class ApetLoRAModel(LoRAModel):
    """An APET adapter where vLLM expects a LoRA one: no LoRA weights, and its deltas by vLLM module name."""

    def __init__(self, lora_model_id: int, deltas: dict[str, ModuleDeltas]):
        super().__init__(lora_model_id, rank=1, loras={})
        self.apet_deltas = deltas

    def clone(self, lora_model_id: int) -> "ApetLoRAModel":
        return ApetLoRAModel(lora_model_id, self.apet_deltas)


def _module_of(name: str, manager: LoRAModelManager) -> tuple[str, int]:
    """The vLLM module holding the Hugging Face layer ``name``, and the slice of it the layer is (0 if unpacked)."""
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)  # (renames only, as vLLM's own LoRA loader: packing is
    mapper = mapper.get_rename_mapper() if mapper is not None else None  # placed below, by slice)
    mapped = mapper._map_name(name + ".weight") if mapper is not None else name + ".weight"
    mapped = (mapped or name + ".weight").removesuffix(".weight")
    if mapped in manager.modules:
        return mapped, 0
    parent, _, leaf = mapped.rpartition(".")
    for packed, parts in manager.packed_modules_mapping.items():
        if leaf in parts and f"{parent}.{packed}" in manager.modules:
            return f"{parent}.{packed}", parts.index(leaf)
    raise BaseMismatchError(f"adapter layer {name!r} is not a layer vLLM serves adapters on in this model (its LoRA "
                            f"layers are e.g. {sorted(manager.modules)[:3]}): a folder for another model?")


def place(layers: dict[str, LayerDeltas], manager: LoRAModelManager, folder: str, model_dir: str
          ) -> dict[str, ModuleDeltas]:
    """Each layer's deltas at their place in vLLM's modules, the checkpoint's base weights (``model_dir``) checked
    against the adapter."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, deltas in layers.items():
        vname, j = _module_of(name, manager)
        module = manager.modules[vname]
        if module.tp_size > 1:
            raise ApetValueError(f"{vname} is split over {module.tp_size} tensor-parallel ranks: the APET plugin places "
                                 "deltas with tensor_parallel_size=1 only (merge the adapter for a sharded server)")
        slices = getattr(module, "output_slices", (module.output_size,))
        if len(slices) != len(manager.packed_modules_mapping.get(vname.rpartition(".")[2], [None])):
            raise ApetValueError(f"vLLM packs {vname} into {len(slices)} slices where the adapter's layers are "
                                 f"{manager.packed_modules_mapping.get(vname.rpartition('.')[2])}: the plugin cannot "
                                 f"place {name!r}; merge it as the weights load instead (load_format=\"apet_merged\")")
        if not isinstance(module, BaseLinearLayerWithLoRA) or \
                type(module)._apply_lora_to_output is not BaseLinearLayerWithLoRA._apply_lora_to_output:
            raise ApetValueError(f"vLLM serves {vname} through {type(module).__name__}, which the APET plugin does not "
                                 f"apply deltas in: {name!r} cannot be served per request (merge it as the weights "
                                 "load: load_format=\"apet_merged\")")
        offset, rows, cols = sum(slices[:j]), slices[j], module.input_size
        shapes[vname] = (sum(slices), cols)
        if (rows, cols) != deltas.shape:
            raise ApetValueError(f"adapter layer {name!r} has shape {deltas.shape}, its place in vLLM's {vname} is "
                                 f"({rows}, {cols}): the plugin cannot place it")
        base = checkpoint_values(model_dir, f"{name}.weight", deltas.indices)  # (vLLM's CPU weights are repacked)
        if base is None:
            raise BaseMismatchError(f"adapter layer {name!r} ({folder}): the checkpoint {model_dir} holds no "
                                    f"{name}.weight: a folder for another model?")
        deltas.check_base_values(base, f"the checkpoint vLLM serves ({model_dir})")
        flat = (deltas.indices // cols + offset) * cols + deltas.indices % cols
        parts.setdefault(vname, []).append((flat, deltas.values))
    placed = {vname: ModuleDeltas(torch.cat([i for i, _ in ps]), torch.cat([v for _, v in ps]), shapes[vname])
              for vname, ps in parts.items()}
    rank = manager.lora_config.max_lora_rank
    for vname, deltas in placed.items():  # (before vLLM registers the adapter: a refusal changes nothing)
        if deltas.indices.numel() > slot_capacity(rank, deltas.shape):
            raise ApetValueError(f"{folder} puts {deltas.indices.numel():,} deltas on vLLM's {vname} {deltas.shape}, "
                                 f"over the {slot_capacity(rank, deltas.shape):,} a slot holds at max_lora_rank={rank} "
                                 "(LoRA's parameter count at that rank): start vLLM with a larger max_lora_rank")
    return placed


def _load_adapter(original):
    def load(self: WorkerLoRAManager, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        if not is_apet_folder(path):
            return original(self, lora_request)
        if self._apet_refusal:
            raise ApetValueError(self._apet_refusal)
        deltas = place(read_sparse_adapter(path), self._adapter_manager, path, model_folder(*self._apet_model))
        return ApetLoRAModel(lora_request.lora_int_id, deltas)
    return load


def _init(original):
    def init(self: WorkerLoRAManager, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        self._apet_model = (vllm_config.model_config, vllm_config.load_config)  # (the folder is found at the first
        self._apet_refusal = refusal(self.device, vllm_config)                  # APET load only)
    return init


def refusal(device: torch.device, vllm_config) -> str | None:
    """Why this engine cannot serve APET adapters per request, or None."""
    from vllm import envs
    if envs.VLLM_LORA_ENABLE_DUAL_STREAM or vllm_config.lora_config.fully_sharded_loras:
        return ("VLLM_LORA_ENABLE_DUAL_STREAM and fully_sharded_loras run vLLM's LoRA layers through paths the APET "
                "plugin does not apply deltas in: unset them to serve APET adapters per request")
    # vLLM's CPU platform turns compilation off with LoRA; on a GPU the slot table's kernel is written for CUDA
    # graphs (vllm_slots) but has not run inside vLLM's graphs yet: eager only until a GPU session checks it
    if device.type != "cpu" and not vllm_config.model_config.enforce_eager:
        return (f"per-request APET adapters on {device.type} run eagerly only for now: start vLLM with "
                "enforce_eager=True (--enforce-eager), or merge the adapter as the weights load "
                "(load_format=\"apet_merged\")")
    return None


def model_folder(model_config, load_config) -> str:
    """The local folder of the checkpoint vLLM serves (a hub name: its cached snapshot)."""
    if os.path.isdir(model_config.model):
        return model_config.model
    from huggingface_hub import snapshot_download
    return snapshot_download(model_config.model, revision=model_config.revision, cache_dir=load_config.download_dir,
                             local_files_only=True, allow_patterns=["*.safetensors", "*.json"])


def _create_merged_loras_inplace(original):
    def pack(self: LoRAModelManager, lora_model: LoRAModel) -> None:
        if not isinstance(lora_model, ApetLoRAModel):  # (nothing to pack: its deltas were placed at load)
            original(self, lora_model)
    return pack


def _slots(manager: LoRAModelManager, module) -> ModuleSlots:
    """The module's ModuleSlots, made at its first APET adapter."""
    slots = module.__dict__.get(SLOTS)
    if slots is None:
        shape = (sum(getattr(module, "output_slices", (module.output_size,))), module.input_size)
        slots = module.__dict__[SLOTS] = ModuleSlots(
            manager.lora_slots, shape, slot_capacity(manager.lora_config.max_lora_rank, shape), module.device)
    return slots


def _activate_adapter(original):
    def activate(self: LoRAModelManager, lora_id: int) -> bool:
        activated = original(self, lora_id)
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            deltas = getattr(self._registered_adapters[lora_id], "apet_deltas", {})
            for name, module in self.modules.items():
                if name in deltas:
                    _slots(self, module).put(index, deltas[name])
                elif SLOTS in module.__dict__:
                    module.__dict__[SLOTS].put(index, None)
        return activated
    return activate


def _deactivate_adapter(original):
    def deactivate(self: LoRAModelManager, lora_id: int) -> None:
        if lora_id in self.lora_index_to_id:
            index = self.lora_index_to_id.index(lora_id)
            for module in self.modules.values():
                if SLOTS in module.__dict__:
                    module.__dict__[SLOTS].put(index, None)
        return original(self, lora_id)
    return deactivate


def _remove_all_adapters(original):
    def remove_all(self: LoRAModelManager) -> None:
        for module in self.modules.values():
            if SLOTS in module.__dict__:
                module.__dict__[SLOTS].clear()
        return original(self)
    return remove_all


def _apply_lora_to_output(original):
    def apply(self: BaseLinearLayerWithLoRA, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        slots = self.__dict__.get(SLOTS)
        if slots is None:
            return original(self, x, output)
        x2d = x.reshape(-1, x.shape[-1])
        token_slots = self.punica_wrapper.token_lora_indices[:x2d.shape[0]]
        if token_slots.shape[0] < x2d.shape[0]:  # (padded tokens: vLLM's mapping covers the scheduled ones only)
            token_slots = torch.nn.functional.pad(token_slots, (0, x2d.shape[0] - token_slots.shape[0]), value=-1)
        if slots.lora_term_needed(token_slots):
            output = original(self, x, output)
        out2d = output.reshape(-1, output.shape[-1])
        slots.add(out2d, x2d, token_slots)
        if out2d.data_ptr() != output.data_ptr():  # (reshape copied)
            output = out2d.reshape(output.shape)
        return output
    return apply


def install() -> None:
    """Patch vLLM's LoRA loading, slots and linear forward (once per process)."""
    if getattr(WorkerLoRAManager, "_apet_installed", False):
        return
    WorkerLoRAManager.__init__ = _init(WorkerLoRAManager.__init__)
    WorkerLoRAManager._load_adapter = _load_adapter(WorkerLoRAManager._load_adapter)
    LoRAModelManager._create_merged_loras_inplace = _create_merged_loras_inplace(
        LoRAModelManager._create_merged_loras_inplace)
    LoRAModelManager.activate_adapter = _activate_adapter(LoRAModelManager.activate_adapter)
    LoRAModelManager._deactivate_adapter = _deactivate_adapter(LoRAModelManager._deactivate_adapter)
    LoRAModelManager.remove_all_adapters = _remove_all_adapters(LoRAModelManager.remove_all_adapters)
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output(BaseLinearLayerWithLoRA._apply_lora_to_output)
    WorkerLoRAManager._apet_installed = True
