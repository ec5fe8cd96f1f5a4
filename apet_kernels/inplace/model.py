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

import torch
import torch.nn as nn

from .. import learning_rate
from ..config import ApetConfig
from ..errors import (ApetStateError, ApetTypeError, ApetValueError)
from ..layer import DEFAULT_ADAPTER, SparseDeltaLinear
from ..load_guard import check_strict_keys, unguard_tree
from ..merging import requantization_summary
from ..adapters.mixed_batch import BASE, batch_shape
from ..schemes import is_seeded
from ..serialization import (INDICES, VALUES, delta_key, index_checksum, read_folder, write_folder)
from ..sharded import full_tensor, is_dtensor
from ..adapters.choosing import choose_positions
from ..adapters.patching import add_adapter_to_model, add_entries, give_back_layers, merged_replacements, note_lr_hint
from ..adapters.records import check_record, resolve_positions, saved_entry, saved_tensor, seeded_indices
from .hooks import _BaseRows, _remove_model_hooks
from .state import _patch_of, is_patched


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
            if not is_seeded(config.method):
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
                seeded = seeded_indices(config, lname, info)
                if seeded is None:
                    continue  # (stored positions: the values go where the positions are)
                try:
                    check_record(seeded, lname, info, "the positions its seed gives now")
                except ValueError as exc:
                    raise ApetValueError(f"{delta_key(lname, adapter, VALUES)} comes without indices and this layer's "
                                         f"positions have moved, but {exc}: load a state dict that carries the "
                                         "indices") from None
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
        try:
            add_adapter_to_model(self, config, adapter_name, choose_positions(self, config))
        finally:  # (wrapping freezes a base layer: the flags go back whether it succeeded or not)
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
        indices = resolve_positions(adapter, layers, lambda m: (m.out_features, m.in_features),
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
                    tensors[key] = saved_tensor(state_dict, key, own)
        params = dict(self.named_parameters(remove_duplicate=False))
        for pname in _patch_of(self).saved_modules:  # modules_to_save, under every name of a tied parameter
            tensors[pname] = saved_tensor(state_dict, pname, params[pname])
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


_CLASSES: dict[type, type] = {}  # a model class -> its patched subclass (one per class)


def _new_patched(original_class: type) -> nn.Module:
    return object.__new__(_apet_class(original_class))


def _apet_class(cls: type) -> type:
    """The patched class of ``cls``: ``ApetModel`` first, with ``cls``'s name (transformers reads class names)."""
    if cls not in _CLASSES:
        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        if callable(getattr(cls, "generate", None)):
            body["generate"] = ApetModel._generate_with_adapter_names
        _CLASSES[cls] = type(cls.__name__, (ApetModel, cls), body)
    return _CLASSES[cls]
