"""APET as a PEFT method: ``ApetTuner`` is PEFT's model role for ``ApetConfig`` (as ``LoraModel`` is LoRA's).

    from peft import get_peft_model, PeftModel
    model = get_peft_model(base, ApetConfig(density=1e-3))     # a PeftModel; its tuner layers: SparseDeltaLinear
    model.save_pretrained("out/")                                # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_base, "out/")

PEFT does the model-level bookkeeping (adapters by name, ``set_adapter``, ``delete_adapter``,
``disable_adapter()``, ``modules_to_save``, saving and loading); the layer is the same ``SparseDeltaLinear``
``get_apet_model`` patches in place, and both entry points choose positions, wrap targets, save and check
through the same functions (apet_kernels.model). APET differs from PEFT's per-layer tuners in one place: its
budget is split over all targets, so ``inject_adapter`` chooses every target's positions at once.

The saved tensors per layer: ``<layer>.deltas.values`` (fp32) and, where the config's seed does not regenerate
them, ``<layer>.deltas.indices``; the config records per layer its shape, K, an index checksum and a base
fingerprint, checked before a load copies anything.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings

import torch
import torch.nn as nn

from ..adapters.registry import PeftAdapters, first_few
from ..config import ApetConfig
from ..errors import (AdapterFileError, ApetStateError, ApetValueError)
from ..layer import SparseDeltaLinear
from ..learning_rate import describe_config
from .. import process_hooks
from ..load_guard import StrictFirst, needed_by, unguard_tree
from ..merging import requantization_summary
from ..serialization import (INDICES, VALUES, SavedAdapter, index_checksum)
from ..targets import targeted
from ..adapters.choosing import choose_positions
from ..adapters.patching import (adapter_dtype, add_adapter_to_model, give_back_layers, merged_replacements, note_lr_hint,
                                patched_in_place, values_on_meta)
from ..adapters.records import resolve_positions, saved_entry, saved_tensor, stores_positions
from .loading import _CALIBRATION, _AllOrNothingLoadAdapter, saved_positions
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import AuxiliaryTrainingWrapper
from peft.utils.other import set_additional_trainable_modules


_PEFT_PREFIX = "base_model.model."


_INJECTED = "_apet_records_of_injection"  # on a config whose layers this tuner filled in (not a folder's)
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _without_wrappers(name: str) -> str:
    """A module name as the model's state dict writes it: FSDP1's, activation checkpointing's and torch.compile's
    wrapper modules leave no trace in their state dicts."""
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def _written_by_peft_save() -> bool:
    """Whether the adapter state dict being computed will be written: False only inside ``PeftModel.save_pretrained``
    called with ``is_main_process=False`` (Trainer's other ranks under ZeRO-3, which compute it and write nothing).
    PEFT passes no such flag down to a tuner, so its frame is asked."""
    from peft import PeftModel
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is PeftModel.save_pretrained.__code__:
            return bool(frame.f_locals.get("is_main_process", True))
        frame = frame.f_back
    return True


def _apet_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


class ApetTuner(BaseTuner):
    """PEFT's tuner for APET (registered by apet_kernels.peft_registry)."""

    prefix: str = "deltas"
    tuner_layer_cls = SparseDeltaLinear
    target_module_mapping: dict = {}

    def __init__(self, *args, **kwargs):
        needed_by(self)  # before PEFT assigns this tuner to its PeftModel, which then adopts it (_apet_adopted_by)
        super().__init__(*args, **kwargs)

    @property
    def adapter_registry(self) -> PeftAdapters:
        """APET's rules over PEFT's own adapter state (apet_kernels.adapter_registry)."""
        registry = self.__dict__.get("_adapter_registry")
        if registry is None:
            registry = self.__dict__["_adapter_registry"] = PeftAdapters(self)
        return registry

    def refuse_if_unloaded(self, what: str) -> None:
        """After ``unload()`` / ``merge_and_unload()`` the PeftModel no longer holds APET layers: every adapter call
        is refused instead of wrapping the base model it gave back again (or saving an empty adapter)."""
        if self.__dict__.get("_apet_unloaded"):
            raise ApetStateError(f"{what}: this PeftModel was unloaded (unload() / merge_and_unload() gave its base "
                                 "model back, without APET layers); build a new one with peft.get_peft_model or "
                                 "PeftModel.from_pretrained")

    def _apet_adopted_by(self, parent: nn.Module) -> None:
        """Registered under ``parent`` (the PeftModel): its strict loads check the key set before copying, and a
        ``load_adapter`` that fails takes back what it added (apet_kernels.load_guard calls this)."""
        if "load_state_dict" not in parent.__dict__:
            parent.__dict__["load_state_dict"] = StrictFirst(parent)
        if callable(getattr(type(parent), "print_trainable_parameters", None)) and \
                "print_trainable_parameters" not in parent.__dict__:
            parent.__dict__["print_trainable_parameters"] = _ReportWithRate(parent)
        if callable(getattr(type(parent), "load_adapter", None)) and "load_adapter" not in parent.__dict__:
            parent.__dict__["load_adapter"] = _AllOrNothingLoadAdapter(parent)

    # ----------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # "all-linear" and the rest are APET's own target rules (apet_kernels.targets)

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return targeted(key, peft_config)

    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("APET injects all targets at once (inject_adapter): its budget is split over them")

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """Add adapter ``adapter_name`` (its config in ``peft_config``) to the model, all or none, as PEFT's tuners
        do: its targets may be any linear layers (plain ones are wrapped), the other adapters keep their
        trainability; the config object given is the one kept, with this model's per-layer records filled in."""
        self.refuse_if_unloaded(f"adding adapter {adapter_name!r}")
        if state_dict is not None:
            raise ApetValueError("APET adapters are injected from their config (its layers and seed), not from a "
                             "state dict's keys")
        config = self.peft_config[adapter_name]  # (PEFT keeps the object given; its layers are filled in below)
        if patched_in_place(model):
            raise ApetStateError("this model is patched in place (get_apet_model / load_apet): two registries would "
                                 "drive one set of layers. Use its own add_adapter / load_adapter, or unload() it and "
                                 "call get_peft_model on the base model")
        layers = _apet_layers(model)
        if config.layers and any(getattr(m, "weight", None) is not None and m.weight.is_meta
                                 for n, m in model.named_modules() if n in config.layers):
            raise ApetValueError("the base model's weights are on the meta device: an APET adapter is checked against "
                                 "and applied to real weights; load them first (to_empty(device=...) and the model's "
                                 "state dict, or from_pretrained without device_map='meta')")
        if any(adapter_name in m.deltas for m in layers.values()):
            raise ApetStateError(f"this model already holds APET layers with an adapter named {adapter_name!r} (it "
                                 "was wrapped before, by get_peft_model or PeftModel.from_pretrained): use that "
                                 "PeftModel, unload() it first, or choose another adapter_name")
        # adding an adapter leaves the others' trainability as it was (PEFT's rule); the first freezes the base
        flags = [(p, p.requires_grad) for p in model.parameters()]
        if not layers:
            self.__dict__["_flags_before"] = {n: p.requires_grad for n, p in model.named_parameters()}
        # records that came with the config describe a folder's adapter (checked, positions regenerated or awaited);
        # records this tuner filled in on another model (one config building several) are drawn again here
        saved = {} if config.__dict__.get(_INJECTED) else copy.deepcopy(config.layers)
        try:
            indices = saved_positions(model, config) if saved else self._chosen_positions(model, config)
            add_adapter_to_model(model, config, adapter_name, indices)
        except BaseException:  # (nothing was added: the flags and the load guards go back as they were)
            for p, requires_grad in flags:
                p.requires_grad_(requires_grad)
            if not _apet_layers(model):
                unguard_tree(model)
            raise
        config.__dict__[_INJECTED] = not saved
        if saved:
            self.__dict__.setdefault("_never_loaded", set()).add(adapter_name)  # (built from a folder's config)
            for name, info in saved.items():  # stored positions: placeholders until the checkpoint's indices come
                if stores_positions(config, info):
                    model.get_submodule(name).expect_positions(adapter_name)
            config.layers = saved
            config.__dict__["_records_to_check"] = copy.deepcopy(saved)  # (by the load that follows: checksums,
            # fingerprints; _remap_adapter_state_dict_for_load)
        if low_cpu_mem_usage:  # (PEFT's promise: the values come with the state dict that follows, assigned)
            values_on_meta(model, adapter_name)
        note_lr_hint(model, adapter_name, config)
        self.targeted_module_names.extend(n for n in indices if n not in self.targeted_module_names)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_additional_trainable_modules(model=model, peft_config=config, model_config=BaseTuner.get_model_config(self),
                                         adapter_name=adapter_name, activate_adapter=adapter_name in self.active_adapters)
        for p, requires_grad in flags if layers else ():  # (the first adapter: the base stays frozen)
            p.requires_grad_(requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype`` (after injection): True keeps the values in fp32; False gives them the
        base weight's dtype."""
        adapter_dtype(self.model, adapter_name, autocast_adapter_dtype)

    @staticmethod
    def _chosen_positions(model: nn.Module, config: ApetConfig) -> dict[str, torch.Tensor]:
        calibration, loss_fn = _CALIBRATION.get()
        if config.method == "gradient" and calibration is None:
            raise ApetValueError("method='gradient' chooses positions from calibration batches, which peft's "
                             "get_peft_model cannot take: call apet_kernels.get_peft_model(model, config, "
                             "calibration=batches)")
        return choose_positions(model, config, calibration, loss_fn)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for layer in _apet_layers(model).values():  # K = 0 values stay frozen (FSDP2 refuses empty gradients)
            for delta in layer.deltas.values():
                if not delta.k:
                    delta.values.requires_grad_(False)

    # ----------------------------------------------------------------- switching (checked before any layer changes)
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.refuse_if_unloaded("set_adapter()")
        if not adapter_name and not self.active_adapters:  # (every adapter was deleted: PEFT keeps none active)
            return
        self.adapter_registry.check_switch(_apet_layers(self.model), adapter_name,
                                           "unmerge_adapter() first or use strategy='unmerged'")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.refuse_if_unloaded("delete_adapter()")
        self.adapter_registry.check_delete(adapter_name, active_ok=True)  # (PEFT activates another one)
        super().delete_adapter(adapter_name)

    # ----------------------------------------------------------------- mixed-adapter batches (adapter_names=)
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's mixed-adapter batch (``adapter_names=``, in a forward or ``generate``): every APET layer applies each
        row's adapter, and PEFT's own ``modules_to_save`` wrappers are told the names too, as LoRA's tuner does.
        ``generate`` repeats each row for beams or several returned sequences: so are the names."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        names = list(names) if isinstance(names, (list, tuple)) else names
        repeats = _generation_repeats(kwargs)
        rows = [n for n in names for _ in range(repeats)] if isinstance(names, list) else names
        layers = _apet_layers(self.model)
        self.adapter_registry.begin_mixed(layers, rows, "unmerge_adapter() first or use strategy='unmerged'",
                                          training=self.training)
        handles = [self.model.register_forward_pre_hook(_rows_checked(self.adapter_registry), with_kwargs=True)]
        try:
            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper):
                    handles.append(module.register_forward_pre_hook(_names_given(rows), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.adapter_registry.end_mixed(layers)

    # ----------------------------------------------------------------- giving the model back
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, requantize=False) -> nn.Module:
        """PEFT's ``merge_and_unload``; over a quantized base, ``requantize`` as ``ApetModel.merge_and_unload``'s
        (the report lands in ``model.requantization_report``)."""
        return self._unload_and_optionally_merge(progressbar=progressbar, safe_merge=safe_merge,
                                                 adapter_names=adapter_names, requantize=requantize)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None, requantize=False) -> nn.Module:
        self.refuse_if_unloaded("merge_and_unload()" if merge else "unload()")
        layers = _apet_layers(self.model)
        report = None
        self.adapter_registry.refuse_in_mixed_batch("merge_and_unload()" if merge else "unload()")
        if merge:
            self.adapter_registry.check_single_active("merge")
            for layer in layers.values():  # (checks adapter_names and safe_merge before anything changes)
                if adapter_names is not None and list(adapter_names) not in ([], [layer.active_adapter]):
                    raise ApetValueError(f"APET merges the active adapter only ({layer.active_adapter!r}), not "
                                     f"{list(adapter_names)}")
                if safe_merge and not torch.isfinite(layer.delta_values.detach()).all():
                    raise ApetValueError(f"NaNs or infs in the values of adapter {layer.active_adapter!r}: not merged")
            replacements, report = merged_replacements(self.model, layers, requantize)
        else:
            replacements = {}
        give_back_layers(self.model, layers, merge, replacements)
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)  # modules_to_save, config
        unguard_tree(model)  # the whole-state-dict checks go with the layers, as in place
        self.__dict__["_apet_unloaded"] = True
        process_hooks.release(self)
        if requantize is not False:
            model.requantization_report = report
            warnings.warn(requantization_summary(report))
        return model

    # ----------------------------------------------------------------- saving and loading
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Per layer its values, and its indices unless the seed regenerates them. The layer records as saved
        (checksum, base fingerprint) go to the config file PEFT writes next (``ApetConfig.layers_as_saved``); the
        live config keeps the records of its positions as patched, as ``get_apet_model``'s does."""
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, ApetTuner):
            tuner.refuse_if_unloaded("save_pretrained()")
        out, records, written = {}, copy.deepcopy(config.layers), _written_by_peft_save()
        for name, layer in _apet_layers(model).items():
            name = _without_wrappers(name)  # (FSDP1 and activation checkpointing wrap modules; state dicts drop it)
            lname = name.removeprefix(_PEFT_PREFIX)
            if lname not in records or adapter_name not in layer.deltas:
                continue
            for what, own in saved_entry(layer, adapter_name, config, lname, records[lname]).items():
                key = f"{name}.deltas.{adapter_name}.{what}"
                out[key] = saved_tensor(state_dict, key, own, written)
        config.layers_as_saved = records
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the checkpoint against the model before anything is copied, then give its keys the adapter name.

        Every layer needs its values; values without indices are for the seeded positions. A folder loaded as a
        new adapter (``from_pretrained``, ``load_adapter`` of a new name) is checked against its own config's
        records: index checksums and base fingerprints. A checkpoint loaded into a live adapter (Trainer's resume
        and best model) may hold positions regrown since: its indices are checked for range, order and K."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = _apet_layers(model)
        prefix = _PEFT_PREFIX if any(n.startswith(_PEFT_PREFIX) for n in layers) else ""
        modules = {n.removeprefix(prefix): m for n, m in layers.items()}
        folder = config.__dict__.pop("_records_to_check", None)
        tuner = getattr(model, "base_model", None)
        folder_config = tuner.__dict__.get("_folder_for_live", {}).get(adapter_name) if isinstance(tuner, ApetTuner) \
            else None
        if folder_config is not None:  # a folder loaded into a live adapter: its own seed and records decide
            folder = copy.deepcopy(folder_config.layers)
        base_keys = sorted(k for k in state_dict if any(k.startswith(f"{n}.") and ".deltas." not in k
                                                        for n in layers))
        if base_keys:  # (a layer's legacy key upgrade would take them as its frozen weight: LoRA ignores them too)
            warnings.warn(f"the adapter checkpoint holds base-model weights ({first_few(base_keys)}): ignored, an "
                          "adapter never replaces the frozen base")
            state_dict = {k: v for k, v in state_dict.items() if k not in base_keys}
        listed = {f"{prefix}{lname}.deltas." for lname in config.layers}
        strays = sorted(k for k in state_dict if ".deltas." in k and k.rsplit(".", 1)[-1] in (VALUES, INDICES)
                        and not any(k.startswith(p) for p in listed))
        if strays:  # (PEFT would leave them out silently: trained values lost)
            raise AdapterFileError(f"the checkpoint holds {strays[0]!r}, a layer its config does not list (a damaged or "
                                   "edited adapter_config.json?): nothing was loaded")
        saved = SavedAdapter(copy.deepcopy(folder_config if folder_config is not None else config))
        if folder is None:  # the live adapter's own positions: seeded ones regenerate, stored ones come with indices
            for info in saved.config.layers.values():
                info.pop("base_fingerprint", None)
                info.pop("positions", None)
        else:
            saved.config.layers = folder
        for lname, info in saved.config.layers.items():
            key = f"{prefix}{lname}.deltas.{adapter_name}."
            values = state_dict.get(key + VALUES)
            if values is None or tuple(values.shape) != (int(info["k"]),) or not values.is_floating_point():
                raise ApetValueError(f"the checkpoint's {lname}.deltas.{VALUES} is missing or not a float tensor of shape "
                                 f"({int(info['k'])},)")
            saved.values[lname] = values
            saved.indices[lname] = state_dict.get(key + INDICES)
            if folder is None and saved.indices[lname] is not None:
                info["checksum"] = index_checksum(saved.indices[lname])  # (moved positions: range and K checked)
        positions = resolve_positions(saved, modules, lambda m: (m.out_features, m.in_features),
                                       lambda m, idx: m.base_values_at(idx), "the checkpoint", False,
                                       "with APET layers")
        # the rest of each entry, derived (positions regenerated from the seed, the base read from W; layers the
        # adapter does not tune hold K = 0), so that PEFT finds no adapter key missing
        for lname, layer in modules.items():
            delta = layer.deltas[adapter_name] if adapter_name in layer.deltas else None
            if delta is None:
                continue
            idx = positions.get(lname, delta.indices)
            key = f"{prefix}{lname}.deltas.{adapter_name}."
            state_dict.setdefault(key + VALUES, torch.zeros(idx.numel()))
            state_dict.setdefault(key + INDICES, idx)
            state_dict.setdefault(key + "base", layer.base_values_at(idx))
            state_dict.setdefault(key + "merged", torch.tensor(False))
        return state_dict


class _ReportWithRate:
    """A PeftModel's ``print_trainable_parameters``: PEFT's line, then the suggested-rate line of the active
    adapter, as a model patched in place prints (a callable object, so the model still pickles)."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def __call__(self) -> None:
        model = self.peft_model
        type(model).print_trainable_parameters(model)
        active = model.base_model.active_adapters
        line = describe_config(model.peft_config[active[0]]) if active else ""
        if line:
            print(line)


def _generation_repeats(kwargs: dict) -> int:
    """How many times ``generate`` repeats each input row (beams, or several returned sequences per row)."""
    config = kwargs.get("generation_config")
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(returned))


def _rows_checked(registry: PeftAdapters):
    """A forward pre-hook on the model: the batch's rows must match the names given (one per row)."""
    def hook(module, args, kwargs):
        if registry.mixed is not None:
            registry.mixed.begin_forward(args, kwargs)
        return args, kwargs
    return hook


def _names_given(names: list[str]):
    """A forward pre-hook handing the rows' adapter names to one of PEFT's modules_to_save wrappers."""
    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs
    return hook
