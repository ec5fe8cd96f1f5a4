"""Patching a model in place (``get_apet_model``, ``load_apet``, ``ApetModel``), and what both entry points share
with APET's PEFT tuner (apet_kernels.tuner): choosing positions, wrapping targets, adding adapters, the saved
entry of a layer, checking a load, unloading.

    model = get_apet_model(AutoModelForCausalLM.from_pretrained(...), ApetConfig(density=1e-3))
    model.print_trainable_parameters()
    ...train (your loop, transformers' Trainer, TRL's trainers)...
    model.save_pretrained("out/")             # the deltas only, in the folder format both entry points read
    model = load_apet(fresh_base_model, "out/")

``get_apet_model`` returns the model it was given, patched: the target linears become SparseDeltaLinear
layers and the instance's class becomes a subclass of its own class and of ``ApetModel`` (as
``torch.nn.utils.parametrize`` does), with the same name. The model keeps every meaning transformers,
TRL and accelerate rely on (``base_model`` is its backbone, its ``forward`` signature and label names,
``activation_checkpointing_enable``, ``config``), while ``save_pretrained`` writes the adapters only,
in the file transformers' Trainer loads when it resumes. ``unload()`` / ``merge_and_unload()`` give back
the model with its own class.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from . import learning_rate
from .adapter_registry import AdapterRegistry, first_few
from .config import ApetConfig
from .errors import AdapterFileError, ApetStateError, ApetTypeError, ApetValueError, BaseMismatchError
from .layers import DEFAULT_ADAPTER, SparseDeltaLinear, check_adapter_name
from .linear_like import is_linear_like, linear_shape, weight_oi
from .load_guard import check_strict_keys, guard, guard_ancestors, unguard_tree
from .merging import activation_dtype, merge_quantized, requantization_summary
from .mixed_batch import BASE, batch_shape
from .positions import GradientScores
from .quantized import dequantize, quantization_of, values_at
from .selection import METHODS, magnitude_indices, seeded_generator, select_indices
from .serialization import (INDICES, SKETCH_QUANTIZATION_ONLY, VALUES, SavedAdapter, base_fingerprint, base_sketch,
                            delta_key, index_checksum, read_folder, regenerable, sketch_distance, write_folder)
from .sharded import full_tensor, is_dtensor
from .targets import find_targets, layer_budget, replace_linears, set_module, shared_parameter_ids, targeted, within


@dataclass
class _Patch:
    """What patching changed on a model, to give it back, and the model-level adapter state."""
    original_class: type
    requires_grad: dict[str, bool]  # every parameter's flag before patching
    saved_modules: dict[str, torch.Tensor]  # modules_to_save as they were (unload() restores them)
    adapters: AdapterRegistry = field(default_factory=AdapterRegistry)  # configs by name, active ones, mixed batch
    call_owns_mixed: bool = False  # the current call started it (model(..., adapter_names=))
    originals_in_use: bool = False  # modules_to_save hold their weights as patched (disabled; saved_modules: trained)
    base_row_hooks: list = field(default_factory=list)  # a mixed batch's hooks on modules_to_save (_BaseRows)


class ApetModel(nn.Module):
    """The mixin a patched model's class gets (see the module docstring). A patched model is still a transformers
    model, so the adapter methods it shares with transformers' ``PeftAdapterMixin`` take transformers' signatures
    and mean what they mean there (``add_adapter(adapter_config, adapter_name=None)``, ``load_adapter(path,
    adapter_name=None)``, ``set_adapter``, ``delete_adapter(names)``, ``enable_adapters()`` / ``disable_adapters()``,
    ``active_adapters()``, ``get_adapter_state_dict``); the rest follow PEFT's names. transformers' own PEFT flag
    (``_hf_peft_config_loaded``) is not set: its code never runs on a patched model."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = self._with_seeded_positions(state_dict)
        if strict:  # missing / unexpected keys refused before anything is copied (torch reports them after)
            check_strict_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _with_seeded_positions(self, state_dict):
        """``state_dict``, plus the seeded indices of every adapter layer whose values come without indices while
        the layer's positions have moved since patching (regrowth). Such values were saved for the seeded
        positions (a folder stores the seed while positions never moved): loaded alone they would land on the
        regrown ones (issue 33: Trainer's load_best_model_at_end after a regrowth, silently)."""
        patch, layers, added = _patch_of(self), None, {}
        for adapter, config in patch.adapters.configs.items():
            if config.method not in METHODS:
                continue  # data-driven positions: folders always carry their indices
            for lname, info in config.layers.items():
                if delta_key(lname, adapter, VALUES) not in state_dict or \
                        delta_key(lname, adapter, INDICES) in state_dict:
                    continue
                layers = layers if layers is not None else self.apet_layers()
                delta = layers[lname].deltas[adapter] if lname in layers and adapter in layers[lname].deltas else None
                if delta is None or not delta.k or delta.indices.is_meta or \
                        index_checksum(delta.indices) == info.get("checksum"):
                    continue  # the positions are the seeded ones: values alone are right
                seeded = select_indices(tuple(info["shape"]), int(info["k"]), method=config.method, seed=config.seed,
                                        key=lname)
                if index_checksum(seeded) != info.get("checksum"):
                    raise ApetValueError(f"{delta_key(lname, adapter, VALUES)} comes without indices and this layer's "
                                     "positions have moved, but its seed no longer gives the positions it was "
                                     "patched with: load a state dict that carries the indices")
                added[delta_key(lname, adapter, INDICES)] = seeded.to(delta.indices.device, delta.indices.dtype)
        return {**state_dict, **added} if added else state_dict

    # ----------------------------------------------------------------- what is patched
    def apet_layers(self) -> dict[str, SparseDeltaLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, SparseDeltaLinear)}

    @property
    def apet_configs(self) -> dict[str, ApetConfig]:
        return dict(_patch_of(self).adapters.configs)

    @property
    def apet_config(self) -> ApetConfig:
        """The active adapter's config."""
        adapters = _patch_of(self).adapters
        return adapters.configs[adapters.active[0]]

    @property
    def active_adapter(self) -> str:
        return _patch_of(self).adapters.active[0]

    def active_adapters(self) -> list[str]:
        """The adapter trained and applied, then others applied with it (``set_adapter`` with a list). A method,
        as transformers' ``active_adapters()``."""
        return list(_patch_of(self).adapters.active)

    @property
    def adapters(self) -> list[str]:
        """Adapter names, the active one first."""
        return _patch_of(self).adapters.names

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """PEFT's line, and on a second one the learning rate to start from (apet_kernels.suggested_lr)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")
        hint = learning_rate.describe(self)
        if hint:
            print(hint)

    # ----------------------------------------------------------------- disabling
    @contextlib.contextmanager
    def disable_apet(self):
        """Within the block the model computes as the unpatched base model. Blocks nest; an exception
        leaves each layer as it was before the block. Merged layers keep W + S in their weight and
        compute the base output exactly around it, so a reference pass between a forward and its
        backward (KL terms, DPO reference log-probabilities) leaves that backward intact."""
        _patch_of(self)  # (refuses on a model already unloaded)
        before = [(layer, layer.apet_disabled) for layer in self.apet_layers().values()]
        swapped = self._use_original_modules(True)
        for layer, _ in before:
            layer.apet_disabled = True
        try:
            yield self
        finally:
            for layer, was in before:
                layer.apet_disabled = was
            if swapped and is_patched(self):  # (unloaded inside the block: unload() gave the weights back already)
                self._use_original_modules(False)

    def _use_original_modules(self, original: bool) -> bool:
        """modules_to_save compute with their weights as patched (``original``) or as trained: the two sets of
        tensors swap places (``.data``: no copy, and a graph built before the swap reads the same tensors again
        once they are swapped back). Returns whether anything changed."""
        patch = _patch_of(self)
        if patch.originals_in_use == original or not patch.saved_modules:
            return False
        params, seen = dict(self.named_parameters(remove_duplicate=False)), set()
        with torch.no_grad():
            for name, other in patch.saved_modules.items():
                p = params.get(name)
                if p is None or id(p) in seen or p.shape != other.shape:
                    continue  # (a tied parameter swaps once; a resized one is left alone)
                seen.add(id(p))
                current = p.data
                p.data = other
                patch.saved_modules[name] = current
        patch.originals_in_use = original
        return True

    disable_adapter = disable_apet  # PEFT's name

    # ----------------------------------------------------------------- several adapters
    def add_adapter(self, adapter_config: ApetConfig, adapter_name: str | None = None) -> None:
        """Add an inactive adapter (zero values, or ``init_weights=False``'s small random ones) on the layers
        ``adapter_config`` targets, as ``PeftModel.add_adapter`` does: any linear layer (one not patched yet is
        wrapped, running the other adapters with K = 0), positions of any scheme but ``gradient`` (which needs
        data: load a folder that stores them). The other adapters keep their trainability; ``set_adapter`` makes
        this one the one applied and trained. All or nothing.

        transformers' signature; PEFT's order (``add_adapter(adapter_name, config)``) is accepted too. Without a
        name, ``"default"`` as in transformers (which the first adapter usually holds already)."""
        if isinstance(adapter_config, str) and not isinstance(adapter_name, str):  # PEFT's argument order
            adapter_config, adapter_name = adapter_name, adapter_config
        adapter_name = DEFAULT_ADAPTER if adapter_name is None else adapter_name
        _patch_of(self).adapters.check_new(adapter_name)
        if not isinstance(adapter_config, ApetConfig):
            raise ApetTypeError(f"add_adapter(adapter_config, adapter_name) takes an ApetConfig, got "
                                f"{type(adapter_config).__name__}")
        if adapter_config.modules_to_save:  # (through PEFT each adapter has its own copies: ModulesToSaveWrapper)
            raise ApetValueError("modules_to_save of a model patched in place belong to the model, not to an added "
                                 "adapter")
        config = copy.deepcopy(adapter_config)
        config.layers = {}
        flags = [(p, p.requires_grad) for p in self.parameters()]
        indices = choose_positions(self, config)
        add_adapter_to_model(self, config, adapter_name, indices)
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        _patch_of(self).adapters.configs[adapter_name] = config
        note_lr_hint(self, adapter_name, config)

    def _add_entries(self, name: str, config: ApetConfig, indices: dict[str, torch.Tensor],
                     values: dict[str, torch.Tensor]) -> None:
        add_entries(self.apet_layers(), name, indices, values)
        _patch_of(self).adapters.configs[name] = config
        note_lr_hint(self, name, config)

    def load_adapter(self, peft_model_id: str, adapter_name: str | None = None, *, strict: bool = False,
                     **kwargs) -> None:
        """Add the adapter saved in the local folder ``peft_model_id`` (its active one) under ``adapter_name``
        (default ``"default"``, as in transformers), inactive. Its layers must be among this model's APET layers;
        everything is checked before anything changes. transformers' further arguments (hub downloads, device
        maps, hotswapping) do not apply to an APET folder and are refused by name."""
        if kwargs:
            raise ApetTypeError(f"load_adapter of an APET-patched model reads a local APET folder; "
                                f"{sorted(kwargs)} {'is' if len(kwargs) == 1 else 'are'} not supported")
        directory = peft_model_id
        adapter_name = DEFAULT_ADAPTER if adapter_name is None else adapter_name
        _patch_of(self).adapters.check_new(adapter_name)
        saved = read_folder(directory)
        if saved.others:
            raise ApetValueError(f"{saved.path} holds {sorted(saved.others)[0]!r}: modules_to_save belong to the model, "
                             f"not to an added adapter (load that folder with load_apet)")
        adapter = saved.adapters[saved.active[0]]
        layers = self.apet_layers()
        indices = _resolve_positions(adapter, layers, lambda m: (m.out_features, m.in_features),
                                     lambda m, idx: m.base_values_at(idx), saved.path, strict,
                                     "with APET layers (added adapters tune a subset of them)")
        saved.check_one_save()
        config = copy.deepcopy(adapter.config)
        self._add_entries(adapter_name, config, indices, adapter.values)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Apply and train adapter ``adapter_name`` instead of the active one. Each layer rewrites only the
        positions involved (merged: W restored at the old K positions, base + v written at the new K). Every
        adapter keeps its own values Parameters: an optimizer built for one keeps training it when it is
        active again (an optimizer stepping over inactive adapters only warns).

        A list applies several adapters together, their sparse terms added (every layer unmerged): the
        first is the one trained, the others are applied as they are."""
        _patch_of(self).adapters.switch(self.apet_layers(), adapter_name, "unmerge() them or use strategy='unmerged'")

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Delete one adapter or a list of them (transformers' signature); all are checked first."""
        _patch_of(self).adapters.delete(self.apet_layers(), adapter_names)

    def disable_adapters(self) -> None:
        """transformers' switch: the model computes as its base (modules_to_save included) until
        ``enable_adapters()`` (``disable_apet()`` is the same for one block)."""
        _patch_of(self)
        for layer in self.apet_layers().values():
            layer.enable_adapters(False)
        self._use_original_modules(True)

    def enable_adapters(self) -> None:
        _patch_of(self)
        for layer in self.apet_layers().values():
            layer.enable_adapters(True)
        self._use_original_modules(False)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None
                               ) -> dict[str, torch.Tensor]:
        """transformers' name for ``adapter_state_dict``: the tensors saved for one adapter (default: the active
        one), on the CPU, taken from ``state_dict`` where given."""
        _, _, tensors = self._folder_contents([adapter_name or self.active_adapter], state_dict)
        return {k: t.to("cpu").contiguous() for k, t in tensors.items()}

    def enable_peft_hotswap(self, *args, **kwargs) -> None:
        raise NotImplementedError("hotswapping is transformers' LoRA feature; an APET-patched model switches "
                                  "adapters with add_adapter / load_adapter and set_adapter")

    # ----------------------------------------------------------------- mixed-adapter batches
    @contextlib.contextmanager
    def mixed_batch(self, adapter_names, *, expand: bool = False):
        """Inference where batch row i uses adapter ``adapter_names[i]`` (``"__base__"``: none), as PEFT's
        mixed-batch forward: ``with model.mixed_batch(["a", "b", "a"]): model(ids)``, or
        ``model(ids, adapter_names=[...])``, or ``generate(..., adapter_names=[...])`` (which repeats each
        name for the rows generation expands it to). Every APET layer must run unmerged; the outputs carry
        no gradient; one name per row, exactly."""
        self._begin_mixed_batch(adapter_names, expand)
        try:
            yield self
        finally:
            self._end_mixed_batch()

    def _begin_mixed_batch(self, adapter_names, expand: bool = False) -> None:
        patch = _patch_of(self)
        patch.adapters.begin_mixed(self.apet_layers(), adapter_names,
                                   "call unmerge() on them or use strategy='unmerged'", expand, training=self.training)
        patch.base_row_hooks = self._base_rows_of_saved_modules()

    def _end_mixed_batch(self) -> None:
        patch = _patch_of(self)
        patch.adapters.end_mixed(self.apet_layers())
        patch.call_owns_mixed = False
        for handle in patch.base_row_hooks:
            handle.remove()
        patch.base_row_hooks = []

    def _base_rows_of_saved_modules(self) -> list:
        """In a mixed batch, the ``"__base__"`` rows of each module of modules_to_save are computed with its weights
        as patched (the base model's), the others with its trained ones (forward hooks, removed at the end)."""
        patch = _patch_of(self)
        if BASE not in patch.adapters.mixed.names or not patch.saved_modules:
            return []
        owners = sorted({name.rpartition(".")[0] for name in patch.saved_modules})
        tops = [m for m in owners if not any(m.startswith(o + ".") for o in owners if o != m)]
        return [self.get_submodule(name).register_forward_hook(_BaseRows(patch, name), with_kwargs=True)
                for name in tops]

    def _generate_with_adapter_names(self, *args, adapter_names=None, **kwargs):
        """The model's own ``generate``; ``adapter_names``: one adapter per input row (see ``mixed_batch``)."""
        generate = super(ApetModel, self).generate
        if adapter_names is None:
            return generate(*args, **kwargs)
        rows, _ = batch_shape(args, kwargs)
        if rows is not None and len(adapter_names) != rows:
            raise ApetValueError(f"adapter_names has {len(adapter_names)} names for a batch of {rows} rows")
        with self.mixed_batch(adapter_names, expand=True):
            return generate(*args, **kwargs)

    # ----------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str, *, is_main_process: bool = True, state_dict: dict | None = None,
                        safe_serialization: bool = True, selected_adapters: list[str] | None = None,
                        push_to_hub: bool = False, **kwargs) -> None:
        """Write the adapters (all of them, or ``selected_adapters``) and ``modules_to_save``: ``apet_config.json``
        and ``model.safetensors`` (apet_kernels.serialization), about 4 bytes per tuned parameter for seeded
        positions (8 for stored ones). Never the frozen weights, never pickles.

        The signature is ``PreTrainedModel.save_pretrained``'s, which transformers' Trainer calls for checkpoints
        and ``save_model``: only the main process writes (``is_main_process``); a ``state_dict`` given (a
        gathered one under FSDP or DeepSpeed) is where the tensors are taken from. Sharded by FSDP2 and without a
        ``state_dict``, every rank must call it (the deltas are gathered, a collective); the main process writes.
        ``safe_serialization`` is accepted and ignored (always safetensors); other keyword arguments of
        transformers' method are ignored."""
        _patch_of(self)  # (refuses on a model already unloaded)
        if push_to_hub:
            raise ApetValueError("push_to_hub is not supported: save to a folder and upload it yourself")
        sharded = state_dict is None and any(is_dtensor(p) for p in self.parameters())
        if not is_main_process and not sharded:
            return
        disabled = self._use_original_modules(False)  # (saved inside a disabled block: the trained modules)
        try:
            configs, active, tensors = self._folder_contents(selected_adapters, state_dict)
        finally:
            if disabled:
                self._use_original_modules(True)
        if is_main_process:
            write_folder(save_directory, configs, active, tensors)

    save_apet = save_pretrained

    def _folder_contents(self, selected: list[str] | None, state_dict: dict | None):
        adapters = _patch_of(self).adapters
        names = list(adapters.configs) if selected is None else [selected] if isinstance(selected, str) else \
            list(selected)
        unknown = [n for n in names if n not in adapters.configs]
        if unknown or not names:
            raise ApetValueError(f"selected_adapters {selected} must name some of this model's adapters {self.adapters}")
        active = [n for n in adapters.active if n in names] or [names[0]]
        layers = self.apet_layers()
        configs, tensors = {}, {}
        for name in names:
            config = configs[name] = copy.deepcopy(adapters.configs[name])
            for lname, info in config.layers.items():
                for what, own in saved_entry(layers[lname], name, config, lname, info).items():
                    key = delta_key(lname, name, what)
                    tensors[key] = state_dict[key] if state_dict is not None and key in state_dict else own
        params = dict(self.named_parameters(remove_duplicate=False))
        for pname in _patch_of(self).saved_modules:  # modules_to_save, under every name of a tied parameter
            tensors[pname] = state_dict[pname] if state_dict is not None and pname in state_dict else params[pname]
        return configs, active, {k: full_tensor(t).detach() for k, t in tensors.items()}

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` would write for one adapter (default: the active one), on the CPU."""
        return self.get_adapter_state_dict(adapter_name)

    # ----------------------------------------------------------------- giving the model back
    def _restore(self, merge: bool, replacements: dict[str, nn.Module] | None = None) -> nn.Module:
        """Put each base layer back (merged: with W + S written into it; ``replacements``: new modules
        for some layers, built beforehand so that nothing here can fail half-way) and the model's class."""
        replacements = replacements or {}
        patch = _patch_of(self)
        self._use_original_modules(False)  # (unloaded while disabled: saved_modules hold the originals again)
        if not merge:  # checked before anything changes: a failure must leave the patched model whole
            params = dict(self.named_parameters(remove_duplicate=False))
            for name, original in patch.saved_modules.items():
                now = params.get(name)
                if now is None or now.shape != original.shape:
                    raise ApetStateError(
                        f"unload() restores modules_to_save's {name} as patched ({tuple(original.shape)}), but the "
                        f"model now has {'none' if now is None else tuple(now.shape)} there "
                        "(resize_token_embeddings?). Nothing was changed: resize it back first, or merge_and_unload() "
                        "to keep the trained modules as they are")
        give_back_layers(self, self.apet_layers(), merge, replacements)
        params = dict(self.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            if not merge:
                for name, original in patch.saved_modules.items():
                    params[name].copy_(original)
        for name, p in params.items():
            p.requires_grad_(patch.requires_grad.get(name, p.requires_grad))
        _remove_model_hooks(self)
        unguard_tree(self)
        self.__class__ = patch.original_class
        del self.__dict__["_apet_patch"]
        return self

    def merge_and_unload(self, requantize=False) -> nn.Module:
        """Write W + S into each weight for good and return the model with its own class (modules_to_save
        keep their trained weights).

        Quantized layers are dequantized, the deltas added in fp32, and the result cast to the dtype
        the layer was quantized from: by default they become plain float ``nn.Linear`` layers.
        ``requantize=True`` quantizes that weight again the same way (bitsandbytes: same type, block
        size, storage; torchao: the config inferred from the tensor class, or pass the config itself
        as ``requantize=``). Re-quantization rounds most small deltas away: the error it adds against
        keeping the deltas separate is stored per layer in ``model.requantization_report`` and summed
        up in a warning."""
        _patch_of(self).adapters.check_single_active("merge")
        _patch_of(self).adapters.refuse_in_mixed_batch("merge_and_unload()")
        replacements, report = merged_replacements(self, self.apet_layers(), requantize)
        model = self._restore(merge=True, replacements=replacements)
        if requantize is not False:
            model.requantization_report = report
            warnings.warn(requantization_summary(report))
        return model

    def unload(self) -> nn.Module:
        """Restore the original modules, weights, modules_to_save and class bit-exactly; returns the model."""
        _patch_of(self)
        _patch_of(self).adapters.refuse_in_mixed_batch("unload()")
        return self._restore(merge=False)

    # ----------------------------------------------------------------- copies
    def __reduce_ex__(self, protocol):
        # pickle finds classes by name, and this class has its base's name: rebuild it from the base
        return _new_patched, (_patch_of(self).original_class,), self.__getstate__()


def _patch_of(model: nn.Module) -> _Patch:
    """What patching changed; refuses, naming why, on a model already unloaded (a method bound before)."""
    patch = model.__dict__.get("_apet_patch")
    if patch is None:
        raise ApetStateError("this model's APET layers were removed by unload() or merge_and_unload(); patch it "
                             "again with get_apet_model or load_apet")
    return patch


def _new_patched(original_class: type) -> nn.Module:
    return object.__new__(_apet_class(original_class))


_CLASSES: dict[type, type] = {}


def _apet_class(cls: type) -> type:
    """The patched class of ``cls``: ``ApetModel`` first, with ``cls``'s name (transformers reads class names)."""
    if cls not in _CLASSES:
        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        if callable(getattr(cls, "generate", None)):
            body["generate"] = ApetModel._generate_with_adapter_names
        _CLASSES[cls] = type(cls.__name__, (ApetModel, cls), body)
    return _CLASSES[cls]


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, ApetModel) and "_apet_patch" in model.__dict__


# ----------------------------------------------------------------------------- model-level hooks
class _BaseRows:
    """A forward hook on one module of modules_to_save during a mixed batch: its output's ``"__base__"`` rows are
    replaced by those of the same call with the module's weights as patched (``torch.func.functional_call``)."""

    def __init__(self, patch: _Patch, name: str):
        self.patch, self.name, self.running = patch, name, False

    def __call__(self, module, args, kwargs, output):
        plan = self.patch.adapters.mixed
        rows = [i for i, n in enumerate(plan.row_names) if n == BASE] if plan is not None else []
        if self.running or not rows:
            return output
        if not torch.is_tensor(output) or output.dim() == 0 or output.shape[0] != len(plan.row_names):
            raise ApetValueError(f"modules_to_save {self.name!r} returned {type(output).__name__} without one row per "
                                 f"batch row: its '{BASE}' rows cannot run the base model's weights")
        prefix = self.name + "."
        originals = {k[len(prefix):]: t for k, t in self.patch.saved_modules.items() if k.startswith(prefix)}
        self.running = True
        try:
            base = torch.func.functional_call(module, originals, args, kwargs)
        finally:
            self.running = False
        output = output.clone()
        index = torch.tensor(rows, device=output.device)
        output.index_copy_(0, index, base.index_select(0, index).to(output.dtype))
        return output


def _forward_pre_hook(model, args, kwargs):
    patch = model.__dict__.get("_apet_patch")
    names = kwargs.pop("adapter_names", None)
    if patch is None:
        return args, kwargs
    if names is not None:
        model._begin_mixed_batch(names)  # (ended by _forward_hook, which runs even if the forward raises)
        patch.call_owns_mixed = True
    if patch.adapters.mixed is not None:
        try:
            patch.adapters.mixed.begin_forward(args, kwargs)
        except BaseException:
            _forward_hook(model, args, kwargs, None)
            raise
    return args, kwargs


def _forward_hook(model, args, kwargs, output):
    patch = model.__dict__.get("_apet_patch")
    if patch is not None and patch.call_owns_mixed:
        model._end_mixed_batch()


def _strip_legacy_prefix(model, state_dict, prefix, *args):
    """State dicts of 0.1/0.2's wrapper held every key under ``base_model.``."""
    if prefix or not state_dict or not all(k.startswith("base_model.") for k in state_dict):
        return
    if any(k.startswith("base_model.") for k in model.state_dict(keep_vars=True)):
        return
    for key in list(state_dict):
        state_dict[key[len("base_model."):]] = state_dict.pop(key)


def _note_training_state(model, state_dict, prefix, *args) -> None:
    """Is this a training state (deltas and trainable parameters, no frozen weights, as save_pretrained and
    Trainer checkpoints hold)? Then the frozen weights it lacks are not reported missing."""
    if prefix:
        return
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.__dict__["_apet_loading_training_state"] = any(".deltas." in k for k in state_dict) and \
        not any(k in frozen for k in state_dict)


def _training_state_missing_keys(model, incompatible_keys) -> None:
    if not model.__dict__.pop("_apet_loading_training_state", False):
        return
    needed = {n for n, p in model.named_parameters() if p.requires_grad}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k in needed or k.endswith(f".{VALUES}") and ".deltas." in k]


_LOAD_PRE_HOOKS = (_strip_legacy_prefix, _note_training_state)


def _install_model_hooks(model: nn.Module) -> None:
    for hook in _LOAD_PRE_HOOKS:  # before load_guard's whole-state-dict check, which reads the keys
        model._register_load_state_dict_pre_hook(hook, with_module=True)
    guard(model)
    model.register_load_state_dict_post_hook(_training_state_missing_keys)
    model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    model.register_forward_hook(_forward_hook, with_kwargs=True, always_call=True)


def _remove_model_hooks(model: nn.Module) -> None:
    ours = set(_LOAD_PRE_HOOKS) | {_training_state_missing_keys, _forward_pre_hook, _forward_hook}
    for hooks in (model._load_state_dict_pre_hooks, model._load_state_dict_post_hooks, model._forward_pre_hooks,
                  model._forward_hooks):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) in ours]:
            del hooks[key]
            for extra in (model._forward_pre_hooks_with_kwargs, model._forward_hooks_with_kwargs,
                          model._forward_hooks_always_called):
                extra.pop(key, None)


# ----------------------------------------------------------------------------- patching
def _modules_to_save(model: nn.Module, config: ApetConfig) -> dict[str, nn.Parameter]:
    """Name -> parameter of every module in ``modules_to_save``, under every name a tied parameter has."""
    return {n: p for n, p in model.named_parameters(remove_duplicate=False)
            if within(n.rpartition(".")[0], config.modules_to_save)}


def _check_targets(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    if is_patched(model) or any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ApetValueError("this model already has APET layers (unload() them first, or add_adapter() / "
                         "load_adapter() to add another adapter)")
    _check_shared_weights(targets)


def _warn_tied_modules_to_save(model: nn.Module, saved: dict[str, nn.Parameter]) -> None:
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    for n, p in saved.items():
        others = [o for o in names_of[id(p)] if o not in saved]
        if others:
            warnings.warn(f"modules_to_save: {n} is tied to {others[0]} (the same tensor): training it trains both, "
                          f"and unload() restores both")


def wrap_targets(model: nn.Module, config: ApetConfig, indices: dict[str, torch.Tensor],
                 adapter_name: str) -> None:
    """Replace each module named in ``indices`` by a SparseDeltaLinear holding adapter ``adapter_name`` at those
    positions, all or none, and record per layer its shape, K and index checksum in ``config.layers``. Both entry
    points patch through here: ``get_apet_model`` and PEFT's (apet_kernels.tuner)."""
    check_adapter_name(adapter_name)
    targets = {name: model.get_submodule(name) for name in indices}
    _check_targets(model, targets)
    shared = shared_parameter_ids(model)
    replace_linears(model, lambda name, module: SparseDeltaLinear.from_linear(
        module, indices=indices[name], strategy=config.strategy, backend=config.backend,
        weight_shared=id(module.weight) in shared, adapter_name=adapter_name), targets)
    config.layers = {name: {"shape": list(linear_shape(module)), "k": int(indices[name].numel()),
                            "checksum": index_checksum(indices[name])} for name, module in targets.items()}


def add_entries(layers: dict[str, SparseDeltaLinear], name: str, indices: dict[str, torch.Tensor],
                values: dict[str, torch.Tensor]) -> None:
    """Add adapter ``name`` to every APET layer (K = 0 where it tunes nothing), inactive, all or none."""
    added = []
    try:
        for n, layer in layers.items():
            idx = indices.get(n, layer.empty_indices())
            layer.add_adapter(name, idx, values.get(n))
            added.append(layer)
    except BaseException:
        for layer in added:
            layer.deltas.pop(name)
        raise


def saved_entry(layer: SparseDeltaLinear, adapter: str, config: ApetConfig, lname: str, info: dict
                ) -> dict[str, torch.Tensor]:
    """What a saved adapter holds of one layer: its values, and its indices unless the config's seed regenerates
    them; ``info`` (the config's entry for the layer) gets the checksum and the base fingerprint a load checks."""
    delta = layer.deltas[adapter]
    base = layer.current_base() if adapter == layer.active_adapter else layer.base_values_at(delta.indices)
    stored = not regenerable(config, lname, delta.indices)
    quant = layer.quantization
    info.update(checksum=index_checksum(delta.indices), base_fingerprint=base_fingerprint(base),
                base_sketch=base_sketch(base), base_quantization=str(quant) if quant is not None else None,
                positions="stored" if stored else "seed", k=int(delta.k))
    return {VALUES: delta.values, INDICES: delta.indices} if stored else {VALUES: delta.values}


def merged_replacements(model: nn.Module, layers: dict[str, SparseDeltaLinear], requantize
                        ) -> tuple[dict[str, nn.Module], dict]:
    """For merge_and_unload: the new module of each quantized layer (dequantized, W + S, requantized if asked)
    and the requantization report, all built before any layer changes."""
    quantized = {n: m for n, m in layers.items() if m.quantization is not None}
    if requantize is not False and not quantized:
        raise ApetValueError("requantize needs quantized layers; this model has none (its merged weights are "
                         "written in its own float dtype)")
    tied = [n for n, m in layers.items() if m.weight_shared]
    if tied:
        warnings.warn(f"merging into weights shared with other modules changes them too: {tied}")
    config = None if requantize is True or requantize is False else requantize
    dtype = activation_dtype(model)
    replacements, report = {}, {}
    for name, layer in quantized.items():
        replacements[name], report[name] = merge_quantized(layer, requantize is not False, config, dtype)
    return replacements, report


def give_back_layers(model: nn.Module, layers: dict[str, SparseDeltaLinear], merge: bool,
                     replacements: dict[str, nn.Module]) -> None:
    """Put each layer's base layer back (merged: with W + S of its active adapter written into it; unmerged: W
    restored bit-exactly), or its replacement. Nothing here fails once the callers' checks passed."""
    for name, layer in layers.items():
        if name not in replacements:
            if merge:
                layer.bake()  # W[p] = cast(base + v), kept
            else:
                layer.unmerge()
        layer.release_weight()
        set_module(model, name, replacements.get(name, layer.base_layer))


def _patch(model: nn.Module, config: ApetConfig, indices: dict[str, torch.Tensor],
           adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Patch the targets in place; if anything fails, the model is left exactly as it was."""
    check_adapter_name(adapter_name)
    _check_targets(model, {})
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    saved = _modules_to_save(model, config)
    _warn_tied_modules_to_save(model, saved)
    originals = {n: p.detach().clone() for n, p in saved.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in saved.values():
            p.requires_grad_(True)
        wrap_targets(model, config, indices, adapter_name)
    except BaseException:
        for name, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        raise
    model.__dict__["_apet_patch"] = _Patch(type(model), requires_grad, originals,
                                           AdapterRegistry({adapter_name: config}, [adapter_name]))
    model.__class__ = _apet_class(type(model))
    _install_model_hooks(model)
    guard_ancestors(model)
    note_lr_hint(model, adapter_name, config)
    return model


def note_lr_hint(model: nn.Module, name: str, config: ApetConfig) -> None:
    """Let an optimizer that trains this adapter's values at a rate its positions bear badly warn (learning_rate)."""
    values = [layer.deltas[name].values for layer in model.modules()
              if isinstance(layer, SparseDeltaLinear) and name in layer.deltas]
    learning_rate.note_adapter(values, config.method, sum(int(v.numel()) for v in values))


def float_weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear-like module's weight as floats (out, in): a view, or a dequantized copy of a quantized one."""
    return dequantize(module) if quantization_of(module) is not None else weight_oi(module).detach()


def weight_at(module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """A linear-like module's weight at flat row-major (out, in) positions (dequantized if quantized)."""
    if quantization_of(module) is not None:
        return values_at(module, indices)
    w = weight_oi(module).detach()
    idx = indices.long().to(w.device)
    return w[idx // w.shape[1], idx % w.shape[1]]


def get_apet_model(model: nn.Module, config: ApetConfig, calibration: Iterable | None = None,
                   loss_fn: Callable | None = None, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Replace the target linears of ``model`` in place with SparseDeltaLinear layers; returns ``model``,
    patched (see the module docstring).

    The budget is split over the targets in proportion to their size (split_budget). Each layer's
    positions come from select_indices(..., seed=config.seed, key=<qualified name>) for the seeded
    methods, from its own weight for ``method="magnitude"``, and for ``method="gradient"`` from
    the gradients of ``calibration`` (an iterable of batches: ``model(**batch).loss``, or
    ``loss_fn(model, batch)``), accumulated without ever forming a layer's dense weight gradient
    (apet_kernels.positions). Everything else is frozen except ``modules_to_save``. ``config`` is
    copied, not changed, so one config can patch several models. If anything fails, the model is
    left exactly as it was.
    """
    _check_targets(model, {})
    config = copy.deepcopy(config)
    config.layers = {}
    indices = choose_positions(model, config, calibration, loss_fn)
    return _patch(model, config, indices, adapter_name)


def choose_positions(model: nn.Module, config: ApetConfig, calibration: Iterable | None = None,
                     loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Each target layer's positions (see get_apet_model), the budget split over the targets. Targets may be APET
    layers already (a further adapter): their positions are chosen on the base weight, never on W + S."""
    targets = find_targets(model, config)
    bases = {name: getattr(m, "base_layer", m) for name, m in targets.items()}
    shapes = {name: linear_shape(m) for name, m in bases.items()}
    budget = layer_budget(model, config, bases, shapes)
    if config.method == "gradient":
        patched = [n for n, m in targets.items() if isinstance(m, SparseDeltaLinear)]
        if patched:
            raise ApetValueError(f"method='gradient' scores plain linear layers, and {first_few(patched)} already hold "
                                 "APET adapters: choose a further adapter's positions with another method, or load "
                                 "a folder that stores them (load_adapter)")
        if calibration is None:
            raise ApetValueError("method='gradient' chooses positions from data: pass calibration=<iterable of batches>")
        scores = GradientScores(model, targets, budget, score=config.gradient_score, pool_factor=config.pool_factor,
                                row_cap=config.row_cap, col_cap=config.col_cap, weight_of=float_weight_oi,
                                backend=config.backend)
        scores.accumulate(calibration, loss_fn)
        return scores.indices()
    if calibration is not None:
        raise ApetValueError(f"calibration data are only used by method='gradient', not {config.method!r}")
    if config.method == "magnitude":
        return {name: magnitude_indices(base_weight_oi(m), budget[name]) for name, m in targets.items()}
    return {name: select_indices(shapes[name], budget[name], method=config.method, seed=config.seed, key=name)
            for name in targets}


def base_weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear-like module's or APET layer's base weight as floats (out, in): never W + S (a merged layer's
    active positions are read back from its saved base)."""
    if not isinstance(module, SparseDeltaLinear):
        return float_weight_oi(module)
    weight = float_weight_oi(module.base_layer)
    idx = module.delta_indices
    if not idx.numel():
        return weight
    weight = weight.clone()  # (a merged layer holds W + S there)
    weight.view(-1)[idx.long()] = module.base_values_at(idx).to(weight.dtype)
    return weight


def initial_values(config: ApetConfig, adapter_name: str, indices: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The values an adapter starts from: none given (zeros: the model computes as its base) unless
    ``config.init_weights`` is False, PEFT's switch for an adapter that changes the output: N(0, 0.1^2), drawn
    from the config's seed, the layer's name and the adapter's, so they repeat on any machine."""
    if config.init_weights:
        return {}
    out = {}
    for name, idx in indices.items():
        gen = seeded_generator("init", config.seed, f"{name}:{adapter_name}", (idx.numel(),), idx.numel())
        out[name] = torch.randn(idx.numel(), generator=gen) * 0.1
    return out


def add_adapter_to_model(model: nn.Module, config: ApetConfig, adapter_name: str,
                         indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
    """Put adapter ``adapter_name`` on the layers named in ``indices``, all or none; both entry points add every
    adapter through here. Plain linear layers are wrapped (holding K = 0 entries of the model's other adapters);
    APET layers get an entry (K = 0 where this adapter tunes nothing). ``config.layers`` records each tuned layer's
    shape, K and index checksum. The model's active adapters stay as they were."""
    check_adapter_name(adapter_name)
    values = {**initial_values(config, adapter_name, indices), **(values or {})}
    existing = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    if any(adapter_name in m.deltas for m in existing.values()):
        raise ApetValueError(f"this model's APET layers hold an adapter named {adapter_name!r} already")
    plain = {n: model.get_submodule(n) for n in indices if n not in existing}
    others = list(next(iter(existing.values())).deltas) if existing else []
    active = next(iter(existing.values())).active_adapters if existing else None
    _check_shared_weights(plain)
    shared = shared_parameter_ids(model)
    new = replace_linears(model, lambda name, module: SparseDeltaLinear.from_linear(
        module, indices=indices[name], strategy=config.strategy, backend=config.backend,
        weight_shared=id(module.weight) in shared, adapter_name=adapter_name), plain) if plain else {}
    try:
        for layer in new.values():
            if values.get(_name_of(new, layer)) is not None:
                layer.deltas[adapter_name].values.data.copy_(values[_name_of(new, layer)])
            for other in others:
                layer.add_adapter(other, layer.empty_indices())
            if active is not None:
                layer.set_adapter([a for a in active if a in layer.deltas] or others[:1])
        add_entries(existing, adapter_name, indices, values)
    except BaseException:
        give_back_layers(model, new, merge=False, replacements={})
        raise
    config.layers = {name: {"shape": list(linear_shape(getattr(m, "base_layer", m))), "k": int(indices[name].numel()),
                            "checksum": index_checksum(indices[name])}
                     for name, m in ((n, model.get_submodule(n)) for n in indices)}


def adapter_dtype(model: nn.Module, adapter_name: str, autocast: bool) -> None:
    """PEFT's ``autocast_adapter_dtype``: True keeps the values in fp32 (APET's default, whatever W's dtype); False
    gives them the base weight's float dtype (bf16 / fp16 values for a bf16 / fp16 model)."""
    if autocast:
        return
    for layer in model.modules():
        if isinstance(layer, SparseDeltaLinear) and adapter_name in layer.deltas:
            values = layer.deltas[adapter_name].values
            if layer.base_dtype.is_floating_point and values.dtype != layer.base_dtype:
                values.data = values.data.to(layer.base_dtype)


def values_on_meta(model: nn.Module, adapter_name: str) -> None:
    """``low_cpu_mem_usage``: the adapter's values become empty meta tensors that a load with ``assign=True``
    replaces; until then its layers refuse to run it, naming the meta device."""
    for layer in model.modules():
        if isinstance(layer, SparseDeltaLinear) and adapter_name in layer.deltas:
            delta = layer.deltas[adapter_name]
            delta.values = nn.Parameter(torch.empty_like(delta.values, device="meta"),
                                        requires_grad=delta.values.requires_grad)


def _name_of(layers: dict[str, nn.Module], layer: nn.Module) -> str:
    return next(n for n, m in layers.items() if m is layer)


def _check_shared_weights(targets: dict[str, nn.Module]) -> None:
    owners: dict[int, str] = {}
    for name, module in targets.items():
        other = owners.setdefault(id(module.weight), name)
        if other != name:
            raise ApetValueError(f"target modules {other!r} and {name!r} share one weight: two deltas on one weight "
                             f"cannot both be applied; exclude one of them (exclude_modules)")


# ----------------------------------------------------------------------------- loading
def _resolve_positions(adapter: SavedAdapter, modules: dict[str, nn.Module], shape_of, base_at, path: str,
                       strict: bool, what: str) -> dict[str, torch.Tensor]:
    """Each adapter layer's positions, checked against ``modules`` (shape, checksum, base fingerprint)."""
    from ._checks import check_index_content, check_index_meta
    config, indices, foreign, requantized = adapter.config, {}, [], []
    for name, info in config.layers.items():
        module = modules.get(name)
        if module is None:
            raise BaseMismatchError(f"adapter layer {name!r} is not a linear layer of this model {what}")
        shape = shape_of(module)
        if list(shape) != list(info["shape"]):
            raise BaseMismatchError(f"adapter layer {name!r} has shape {tuple(info['shape'])}, the model's is {tuple(shape)}")
        idx = adapter.indices.get(name)
        if idx is None:
            if config.method not in METHODS or info.get("positions") == "stored":
                raise AdapterFileError(f"{path} lacks the stored positions of adapter layer {name!r}")
            idx = select_indices(shape, int(info["k"]), method=config.method, seed=config.seed, key=name)
        else:
            try:
                check_index_meta(idx, shape[0] * shape[1])
                check_index_content(idx, shape[0] * shape[1])
            except (TypeError, ValueError) as exc:
                raise AdapterFileError(f"{path}: positions of {name}: {exc}") from None
        if idx.numel() != int(info["k"]) or index_checksum(idx) != info["checksum"]:
            raise AdapterFileError(f"adapter layer {name!r}: indices do not match the stored checksum "
                             f"(other seed, key or selection code?)")
        stored = info.get("base_fingerprint")
        if stored is not None and not module.weight.is_meta:
            base = base_at(module, idx)
            if base_fingerprint(base) != stored:
                quant = quantization_of(getattr(module, "base_layer", module))
                quant = str(quant) if quant is not None else None
                sketch = info.get("base_sketch")
                if quant != info.get("base_quantization") and sketch is not None \
                        and sketch_distance(base_sketch(base), sketch) <= SKETCH_QUANTIZATION_ONLY:
                    requantized.append(f"{name} ({info.get('base_quantization') or 'float'} -> {quant or 'float'})")
                else:
                    foreign.append(name)
        indices[name] = idx
    if requantized:
        warnings.warn(f"the base differs from the one the adapter was trained on only by quantization in "
                      f"{len(requantized)} of {len(config.layers)} adapter layers ({first_few(requantized)}): its "
                      f"weights at the tuned positions are a quantized (or dequantized) copy of those, so the "
                      f"deltas apply on a slightly different base")
    if foreign:
        message = (f"base fingerprint mismatch in {len(foreign)} of {len(indices)} adapter layers "
                   f"({first_few(foreign)}): this model's weights at the tuned positions differ from those the "
                   f"adapter was trained on")
        if strict:
            raise BaseMismatchError(message + " (strict=True)")
        warnings.warn(message)
    return indices


def load_apet(model: nn.Module, directory: str, *, strict: bool = False, backend: str = "auto") -> nn.Module:
    """Patch a base ``model`` in place with every adapter in ``directory`` (an APET folder of format 1 or 2:
    ``save_pretrained``'s output, or a Trainer checkpoint of a patched model), active as saved.

    Everything is checked before the model is touched: the modules exist and have the stored
    shapes, regenerated indices match their checksums, every tensor is present with the right
    shape and finite. The first mismatch raises a ValueError naming it, and the model stays as
    it was. If the base weights at the tuned positions differ from those the adapter was saved
    over (its fingerprints), this warns naming the layers, or raises with ``strict=True``.
    ``backend`` is a runtime choice (not stored in the adapter). To add an adapter to a patched model,
    use ``model.load_adapter(directory, adapter_name)``.
    """
    if is_patched(model) or any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ApetValueError("load_apet needs a base model without APET layers (call unload() first); "
                         "model.load_adapter(directory, adapter_name) adds an adapter to a patched model")
    backend = ApetConfig(num_params=0, backend=backend).backend  # validated like any config
    saved = read_folder(directory)
    modules = {n: m for n, m in model.named_modules() if n and is_linear_like(m)}
    positions = {name: _resolve_positions(adapter, modules, linear_shape, weight_at, saved.path, strict, "")
                 for name, adapter in saved.adapters.items()}
    saved.check_one_save()
    first = saved.active[0]  # the adapter the model is patched with; the layers are all adapters' layers
    layers = [n for n in modules if any(n in p for p in positions.values())]
    empty = {n: select_indices(linear_shape(modules[n]), 0, key=n) for n in layers}
    config = copy.deepcopy(saved.adapters[first].config)
    config.backend = backend
    # modules_to_save belong to the model, saved with whichever adapter patched it
    config.modules_to_save = config.modules_to_save or next(
        (a.config.modules_to_save for a in saved.adapters.values() if a.config.modules_to_save), None)
    if len(saved.active) > 1 and config.strategy == "auto":
        config.strategy = "unmerged"  # (adapters active together add their terms unmerged)
    params = _modules_to_save(model, config)
    for key, t in saved.others.items():
        if key not in params:
            raise ApetValueError(f"{saved.path} holds {key!r}, which is neither an APET layer nor a parameter of "
                             f"modules_to_save in this model")
        if params[key].shape != t.shape:
            raise ApetValueError(f"{saved.path}: {key} has shape {tuple(t.shape)}, the model's is {tuple(params[key].shape)}")
    _patch(model, config, {n: positions[first].get(n, empty[n]) for n in layers}, first)
    config.layers = {n: info for n, info in config.layers.items() if n in positions[first]}
    try:
        for name, adapter in saved.adapters.items():
            if name != first:
                added = copy.deepcopy(adapter.config)
                added.backend = backend
                model._add_entries(name, added, positions[name], {})
        state = {delta_key(layer, name, VALUES): v for name, adapter in saved.adapters.items()
                 for layer, v in adapter.values.items()}
        state.update(saved.others)
        model.load_state_dict(state, strict=False)
        if saved.active != [first]:
            model.set_adapter(saved.active)
    except BaseException:
        model.unload()
        raise
    return model
