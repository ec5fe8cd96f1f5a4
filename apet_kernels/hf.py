"""Hugging Face glue: patch a transformers model with SparseDeltaLinear layers, PEFT-style.

    model = get_apet_model(AutoModelForCausalLM.from_pretrained(...), ApetConfig(density=1e-3))
    model.print_trainable_parameters()
    ...train...
    model.save_apet("out/")                    # adapter_model.safetensors + apet_config.json
    model = load_apet(fresh_base_model, "out/")
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ._checks import check_finite, check_index_content, check_index_meta
from .config import CONFIG_NAME, WEIGHTS_NAME, ApetConfig
from .layers import SparseDeltaLinear, linear_shape
from .ops.layout import build_layout
from .positions import GradientScores, magnitude_indices
from .quantized import dequantize, float_dtype, quantization_of, quantize_like, values_at
from .selection import METHODS, select_indices, split_budget

# Output layers that "all-linear" leaves alone (PEFT excludes the output layer too).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _within(name: str, spec) -> bool:
    """True if module ``name`` or one of its ancestors matches ``spec``."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), spec) for i in range(1, len(parts) + 1))


def fuses_output_layer(model: nn.Module) -> bool:
    """True when the model's forward computes its loss from the output layer's weight directly, not by
    calling the module: Liger-Kernel's fused linear-cross-entropy (``apply_liger_kernel_to_llama`` and
    friends replace the model's ``forward`` by theirs)."""
    forward = getattr(model, "forward", None)
    forward = getattr(forward, "__func__", forward)
    return getattr(forward, "__module__", "").startswith("liger_kernel") and "lce" in getattr(forward, "__name__", "")


def find_targets(model: nn.Module, config: ApetConfig) -> dict[str, nn.Module]:
    """Qualified name -> linear-like module to patch, in model order."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads.add(id(out_emb))
    targets = {}
    for name, module in model.named_modules():
        if not name or not is_linear_like(module):
            continue
        if (config.target_modules == "all-linear" and id(module) in heads) or not _targeted(name, config):
            continue
        targets[name] = module
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matches no nn.Linear / Conv1D in this model")
    fused = [name for name, m in targets.items() if id(m) in heads]
    if fused and fuses_output_layer(model):
        raise ValueError(f"{fused[0]!r}: this model's forward is Liger-Kernel's fused linear-cross-entropy, which reads "
                         f"the output layer's weight directly, so deltas there would not reach the loss; exclude it "
                         f"(target_modules='all-linear' does) or apply Liger with fused_linear_cross_entropy=False")
    return targets


def _model_dims(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    hidden = next((getattr(cfg, a) for a in ("hidden_size", "n_embd", "d_model") if getattr(cfg, a, None)), None)
    layers = next((getattr(cfg, a) for a in ("num_hidden_layers", "n_layer", "num_layers") if getattr(cfg, a, None)),
                  None)
    if hidden is None or layers is None:
        raise ValueError("budget_like adapter/prompt needs model.config with a hidden size and a layer count")
    layers += getattr(cfg, "num_decoder_layers", 0) if getattr(cfg, "is_encoder_decoder", False) else 0
    return hidden, layers


def budget_like_count(model: nn.Module, spec: str, targets: dict[str, nn.Module]) -> int:
    """The trainable-parameter count of another PET method on this model (the paper's budgets)."""
    kind, _, arg = spec.partition(":")
    params = dict(p.split("=") for p in arg.split(",") if p) if arg else {}
    try:
        if kind == "lora":
            r = int(params["r"])
            return sum(r * (o + i) for o, i in (linear_shape(m) for m in targets.values()))
        if kind == "bitfit":
            return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
        if kind == "adapter":
            d = int(params["d"])
            hidden, layers = _model_dims(model)
            return layers * 2 * (2 * hidden * d + d + hidden)  # two bottleneck adapters per layer
        if kind == "prompt":
            hidden, _ = _model_dims(model)
            return int(params["n"]) * hidden
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot read budget_like={spec!r}: {exc}") from None
    raise ValueError(f"unknown budget_like {spec!r}; use lora:r=R, bitfit, adapter:d=D or prompt:n=N")


def index_checksum(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()[:16]


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


def float_weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear-like module's weight as floats (out, in): a view, or a dequantized copy of a quantized one."""
    return dequantize(module) if quantization_of(module) is not None else _weight_oi(module).detach()


def weight_at(module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """A linear-like module's weight at flat row-major (out, in) positions (dequantized if quantized)."""
    if quantization_of(module) is not None:
        return values_at(module, indices)
    w = _weight_oi(module).detach()
    idx = indices.long().to(w.device)
    return w[idx // w.shape[1], idx % w.shape[1]]


def _first_few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module],
                    targets: Iterable[str] | ApetConfig | None = None) -> dict[str, nn.Module]:
    """Swap linear-like modules of ``model``, in place, for ``make(name, module)``.

    ``targets``: qualified module names, or an ``ApetConfig`` whose ``target_modules`` /
    ``exclude_modules`` pick them (default: ``ApetConfig``'s ``"all-linear"``, output heads excluded).
    If ``make`` raises, every module swapped so far is put back (a new module that claimed its weight,
    like SparseDeltaLinear, releases it) and the error propagates: the model is as it was. Returns
    qualified name -> new module, in model order. Parameters' ``requires_grad`` flags are left alone.
    """
    if targets is None or isinstance(targets, ApetConfig):
        names = list(find_targets(model, targets if targets is not None else ApetConfig(num_params=0)))
    else:
        names = list(targets)
    originals = {name: model.get_submodule(name) for name in names}  # (a missing name fails here, before any swap)
    new: dict[str, nn.Module] = {}
    try:
        for name, module in originals.items():
            new[name] = make(name, module)
            _set_module(model, name, new[name])
    except BaseException:
        for name, module in new.items():
            _set_module(model, name, originals[name])
            release = getattr(module, "release_weight", None)
            if callable(release):
                release()
        raise
    return new


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


class ApetModel(nn.Module):
    """A transformers model whose target linears are SparseDeltaLinear (what get_apet_model returns).

    Attribute access and calls fall through to the wrapped model, so Trainer, generate() and
    friends work on it as on the base model.
    """

    # transformers' Trainer refuses to train a quantized model unless it carries trainable adapters,
    # which it recognizes by PEFT's class or this flag (read on the model it is given, i.e. this wrapper)
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: ApetConfig, requires_grad: dict[str, bool],
                 saved_modules: dict[str, torch.Tensor]):
        super().__init__()
        self.base_model = model
        self.apet_config = config
        self._requires_grad = requires_grad
        self._saved_modules = saved_modules  # modules_to_save as they were: unload() restores them
        self._unloaded_by = None  # "unload()" / "merge_and_unload()" once the layers are gone
        self.active_adapter = "default"  # the one applied and trained
        self.active_adapters = ["default"]  # and the others applied with it (set_adapter with a list)
        self._inactive: dict[str, tuple[ApetConfig, dict]] = {}  # name -> (config, layer -> (indices, values))
        # the base model's own forward, so its signature shows: Trainer reads it to keep the
        # dataset columns the model takes
        self.forward = model.forward
        # a load_state_dict through either is checked as a whole before any layer changes
        for module in (self, model):
            module.register_load_state_dict_pre_hook(check_whole_state_dict)
        self.register_load_state_dict_pre_hook(_note_checkpoint_state)
        self.register_load_state_dict_post_hook(_adapter_checkpoint_missing_keys)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (unpickling): do not recurse
                raise
            return getattr(self.base_model, name)

    def apet_layers(self) -> dict[str, SparseDeltaLinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SparseDeltaLinear)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **extra):
        # the frozen embeddings give inputs without grad: reentrant checkpointing would drop
        # the deltas' gradients, so default to the non-reentrant form
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        newer = getattr(self.base_model, "activation_checkpointing_enable", None)  # transformers >= 5
        if newer is not None:
            newer(activation_checkpointing_kwargs=kwargs, **extra)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **extra)

    activation_checkpointing_enable = gradient_checkpointing_enable

    def _require_patched(self, what: str) -> None:
        if self._unloaded_by is not None:
            raise RuntimeError(f"{what} needs the APET layers, but {self._unloaded_by} already removed them; "
                               f"the base model now holds "
                               f"{'the merged weights' if self._unloaded_by == 'merge_and_unload()' else 'its own weights'}")

    @contextlib.contextmanager
    def disable_apet(self):
        """Within the block the model computes as the unpatched base model. Blocks nest; an exception
        leaves each layer as it was before the block. Merged layers keep W + S in their weight and
        compute the base output exactly around it, so a reference pass between a forward and its
        backward (KL terms, DPO reference logits) leaves that backward intact."""
        self._require_patched("disable_apet()")
        before = [(layer, layer.apet_disabled) for layer in self.apet_layers().values()]
        for layer, _ in before:
            layer.apet_disabled = True
        try:
            yield self
        finally:
            for layer, was in before:
                layer.apet_disabled = was

    # ----------------------------------------------------------------- several adapters on one base
    @property
    def adapters(self) -> list[str]:
        """Adapter names, the active one first."""
        return [self.active_adapter, *self._inactive]

    def add_adapter(self, name: str, config: ApetConfig) -> None:
        """Add an inactive adapter (zero values) with seeded positions on the patched layers that
        ``config`` targets (a subset of them; the others get no deltas for it). ``set_adapter`` makes it
        the one applied and trained. Data-driven positions come in through ``load_apet(..., adapter_name=)``."""
        self._require_patched("add_adapter()")
        self._check_new_name(name)
        if config.method not in METHODS:
            raise ValueError(f"add_adapter draws seeded positions ({', '.join(METHODS)}), not {config.method!r}; "
                             f"load an adapter with stored positions through load_apet(..., adapter_name=)")
        if config.modules_to_save:
            raise ValueError("modules_to_save belong to the model, not to an added adapter")
        config = copy.deepcopy(config)
        layers = self.apet_layers()
        chosen = {n: m for n, m in layers.items() if _targeted(n, config)}
        if not chosen:
            raise ValueError(f"target_modules={config.target_modules!r} matches none of this model's APET layers")
        shapes = {n: (m.out_features, m.in_features) for n, m in chosen.items()}
        budget = _layer_budget(self.base_model, config, {n: m.base_layer for n, m in chosen.items()}, shapes)
        entries, config.layers = {}, {}
        for n, m in layers.items():
            if n in chosen:
                idx = select_indices(shapes[n], budget[n], method=config.method, seed=config.seed, key=n)
                config.layers[n] = {"shape": list(shapes[n]), "k": int(idx.numel()), "checksum": index_checksum(idx)}
            else:
                idx = torch.empty(0, dtype=m.delta_indices.dtype)
            entries[n] = (idx.to(m.delta_indices.device), torch.zeros(idx.numel(), device=m.delta_values.device))
        self._inactive[name] = (config, entries)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names):
        """Inference where batch row i uses adapter ``adapter_names[i]`` (``"__base__"``: none), as PEFT's
        mixed-batch forward: ``with model.mixed_batch(["a", "b", "a"]): model(ids)`` (or ``generate``).
        Every APET layer must run unmerged; outputs carry no gradient."""
        self._require_patched("mixed_batch()")
        names = list(adapter_names)
        unknown = sorted(set(names) - set(self.adapters) - {"__base__"})
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this model has {self.adapters} (and '__base__')")
        if len(self.active_adapters) > 1:
            raise ValueError("a mixed-adapter batch applies one adapter per row: set_adapter() a single one first")
        layers = self.apet_layers()
        merged = [n for n, m in layers.items() if m.strategy == "merged"]
        if merged:
            raise ValueError(f"a mixed-adapter batch runs unmerged, and {len(merged)} layers are merged "
                             f"({_first_few(merged)}): call unmerge() on them or use strategy='unmerged'")
        groups = {name: [i for i, n in enumerate(names) if n == name] for name in set(names) - {"__base__"}}
        try:  # (a plan that fails half-way is cleared too)
            for lname, layer in layers.items():
                plan = []
                for name, rows in groups.items():
                    if name == self.active_adapter:
                        idx, values = layer.delta_indices, layer.delta_values.detach()
                    else:
                        idx, values = self._inactive[name][1][lname]
                    if idx.numel():
                        row_ptr = build_layout(idx, (layer.out_features, layer.in_features), columns=False).row_ptr
                        plan.append((torch.tensor(rows, device=idx.device), idx, values, row_ptr))
                layer.mixed_batch = plan
            yield self
        finally:
            for layer in layers.values():
                layer.mixed_batch = None

    def __call__(self, *args, adapter_names=None, **kwargs):
        """``model(..., adapter_names=[...])``: a mixed-adapter batch (see ``mixed_batch``)."""
        if adapter_names is None:
            return super().__call__(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return super().__call__(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """The base model's ``generate``; ``adapter_names``: one adapter per batch row (see ``mixed_batch``)."""
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter names are non-empty strings, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already (delete_adapter it first)")

    def set_adapter(self, name: str | list[str]) -> None:
        """Apply and train adapter ``name`` instead of the active one. Each layer rewrites only the
        positions involved (merged: W restored at the old K positions, base + v written at the new K).
        ``delta_values`` are the same Parameters where K is unchanged, new ones elsewhere: build the
        optimizer after switching.

        A list applies several adapters together, their sparse terms added (every layer unmerged): the
        first is the one trained, the others are applied as they are (``active_adapters``)."""
        self._require_patched("set_adapter()")
        names = [name] if isinstance(name, str) else list(name)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"set_adapter takes an adapter name or a list of distinct names, got {name!r}")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}; this model has {self.adapters}")
        layers = self.apet_layers()
        if len(names) > 1:
            merged = [n for n, m in layers.items() if m.strategy == "merged"]
            if merged:
                raise ValueError(f"adapters active together add their sparse terms unmerged, and {len(merged)} layers "
                                 f"are merged ({_first_few(merged)}): unmerge() them or use strategy='unmerged'")
        self._switch_to(names[0], layers)
        for n, layer in layers.items():
            extra = []
            for other in names[1:]:
                idx, values = self._inactive[other][1][n]
                if idx.numel():
                    extra.append((idx, values, build_layout(idx, (layer.out_features, layer.in_features))))
            layer.extra_adapters = extra or None
        self.active_adapters = names

    def _switch_to(self, name: str, layers: dict) -> None:
        if name == self.active_adapter:
            return
        config, entries = self._inactive[name]
        stash = {}
        try:
            for n, layer in layers.items():
                stash[n] = layer.swap_adapter(*entries[n])
        except BaseException:
            for n, old in stash.items():  # put back the layers already switched
                layers[n].swap_adapter(*old)
            raise
        del self._inactive[name]
        self._inactive[self.active_adapter] = (self.apet_config, stash)
        self.apet_config, self.active_adapter = config, name

    def delete_adapter(self, name: str) -> None:
        self._require_patched("delete_adapter()")
        if name in self.active_adapters:
            raise ValueError(f"{name!r} is active: set_adapter() another one before deleting it")
        if name not in self._inactive:
            raise ValueError(f"no adapter named {name!r}; this model has {self.adapters}")
        del self._inactive[name]

    # ----------------------------------------------------------------- transformers.Trainer checkpoints
    def state_dict(self, *args, **kwargs):
        """The whole model's state dict, as for any module, except when transformers' Trainer saves a
        checkpoint or ``save_model``: Trainer only knows PreTrainedModel and PeftModel and saves any
        other model's full ``state_dict()``. Called from ``Trainer._save`` it writes the adapter folder
        (``save_apet``) into the output folder and returns the training state only (``checkpoint_state_dict``):
        checkpoints hold the adapter, not the base weights, and resume loads them back exactly."""
        if not args and not kwargs:
            trainer_save = _trainer_save_frame()
            if trainer_save is not None:
                output_dir, trainer = trainer_save.f_locals.get("output_dir"), trainer_save.f_locals.get("self")
                if output_dir and getattr(getattr(trainer, "args", None), "should_save", True):
                    self.save_apet(output_dir)
                return self.checkpoint_state_dict()
        return super().state_dict(*args, **kwargs)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What resuming needs, under the full state dict's keys: every trainable parameter (the deltas,
        modules_to_save) and every layer's positions. ``load_state_dict`` takes it back as a partial
        state dict (the frozen weights it lacks are not reported missing)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous() for k, v in super().state_dict().items()
                if k in trainable or k.endswith(".delta_indices")}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.apet_layers().items():
            if name not in self.apet_config.layers:
                continue  # a layer the active adapter does not tune (an added adapter's subset)
            tensors[f"{name}.delta_values"] = layer.delta_values.detach()
            if not self._indices_regenerable(name, layer):
                tensors[f"{name}.delta_indices"] = layer.delta_indices
        for name, p in self.base_model.named_parameters():
            if _within(name.rpartition(".")[0], self.apet_config.modules_to_save):
                tensors[name] = p.detach()
        return {k: v.to("cpu").contiguous() for k, v in tensors.items()}

    def _indices_regenerable(self, name: str, layer: SparseDeltaLinear) -> bool:
        """Seeded positions that never moved (no regrowth): the adapter stores the seed, not indices."""
        info = self.apet_config.layers.get(name, {})
        return (self.apet_config.method in METHODS and info.get("checksum") == index_checksum(layer.delta_indices)
                and info.get("positions") != "stored")

    def save_apet(self, directory: str) -> None:
        """adapter_model.safetensors (about 4 bytes per tuned parameter for method='random')
        and apet_config.json. Never pickles. Both files appear together or not at all: they are
        written to a temporary folder beside ``directory`` and moved into place."""
        from safetensors.torch import save_file
        self._require_patched("save_apet()")
        tensors = self.adapter_state_dict()
        for key, t in tensors.items():
            check_finite(t, f"adapter tensor {key}")
        config = copy.deepcopy(self.apet_config)
        for name, layer in self.apet_layers().items():
            if name not in config.layers:
                continue
            stored = f"{name}.delta_indices" in tensors
            quant = layer.quantization
            config.layers[name].update(checksum=index_checksum(layer.delta_indices),
                                       base_fingerprint=base_fingerprint(layer.current_base()),
                                       base_sketch=base_sketch(layer.current_base()),
                                       base_quantization=str(quant) if quant is not None else None,
                                       positions="stored" if stored else "seed")
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{os.path.basename(directory)}.saving-{uuid.uuid4().hex[:8]}")
        os.mkdir(staging)  # (not mkdtemp: its 0700 would become the adapter folder's permissions)
        try:
            config.save_pretrained(staging)
            save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "apet"})
            if not os.path.exists(directory):
                os.rename(staging, directory)  # one atomic step
                return
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # into an existing folder (e.g. a Trainer checkpoint)
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    save_pretrained = save_apet

    def _restore(self, merge: bool, replacements: dict[str, nn.Module] | None = None) -> nn.Module:
        """Put each base layer back (merged: with W + S written into it; ``replacements``: new modules
        for some layers, built beforehand so that nothing here can fail half-way)."""
        self._require_patched("merge_and_unload()" if merge else "unload()")
        replacements = replacements or {}
        for name, layer in self.apet_layers().items():
            if name in replacements:
                pass
            elif merge:
                layer._write_merged(layer.delta_values)  # W[p] = cast(base + v), kept
            else:
                layer.unmerge()
            layer.release_weight()
            _set_module(self.base_model, name, replacements.get(name, layer.base_layer))
        params = dict(self.base_model.named_parameters())
        with torch.no_grad():
            if not merge:
                for name, original in self._saved_modules.items():
                    params[name].copy_(original)
        for name, p in params.items():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        for module in (self, self.base_model):
            _remove_load_check(module)
        self._unloaded_by = "merge_and_unload()" if merge else "unload()"
        return self.base_model

    def merge_and_unload(self, requantize=False) -> nn.Module:
        """Write W + S into each weight for good and return the plain base model (modules_to_save
        keep their trained weights).

        Quantized layers are dequantized, the deltas added in fp32, and the result cast to the dtype
        the layer was quantized from: by default they become plain float ``nn.Linear`` layers.
        ``requantize=True`` quantizes that weight again the same way (bitsandbytes: same type, block
        size, storage; torchao: the config inferred from the tensor class, or pass the config itself
        as ``requantize=``). Re-quantization rounds most small deltas away: the error it adds against
        keeping the deltas separate is stored per layer in ``self.requantization_report`` and summed
        up in a warning."""
        self._require_patched("merge_and_unload()")
        if len(self.active_adapters) > 1:
            raise ValueError(f"adapters {self.active_adapters} are active together: set_adapter() the one to merge")
        layers = self.apet_layers()
        quantized = {n: m for n, m in layers.items() if m.quantization is not None}
        if requantize is not False and not quantized:
            raise ValueError("requantize needs quantized layers; this model has none (its merged weights are "
                             "written in its own float dtype)")
        tied = [n for n, m in layers.items() if m.weight_shared]
        if tied:
            warnings.warn(f"merging into weights shared with other modules changes them too: {tied}")
        config = None if requantize is True or requantize is False else requantize
        dtype = _activation_dtype(self.base_model)
        replacements, report = {}, {}
        for name, layer in quantized.items():  # everything built before any layer changes
            replacements[name], report[name] = _merge_quantized(layer, requantize is not False, config, dtype)
        if requantize is not False:
            self.requantization_report = report
            warnings.warn(_requantization_summary(report))
        return self._restore(merge=True, replacements=replacements)

    def unload(self) -> nn.Module:
        """Restore the original modules, weights and modules_to_save bit-exactly and return the base model."""
        return self._restore(merge=False)


def _activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a quantized model computes in: that of its first float parameter (embeddings, norms)
    that is not a quantized weight. A merged float layer takes it, so it accepts the inputs it gets."""
    quantized = {id(m.base_layer.weight) for m in model.modules()
                 if isinstance(m, SparseDeltaLinear) and m.quantization is not None}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized), None)


@torch.no_grad()
def _merge_quantized(layer: SparseDeltaLinear, requantize: bool, config=None,
                     dtype: torch.dtype | None = None) -> tuple[nn.Module, dict | None]:
    """A quantized layer's merged replacement: dequantized W + S (added in fp32) as a float nn.Linear in
    ``dtype`` (default: the layer's own), or quantized again like the base, with a report: the largest
    error against W + S kept apart, that error's norm over the deltas' norm, and the part of the deltas
    that survives (their projection on what re-quantizing W + S changed relative to re-quantizing W)."""
    base = layer.base_layer
    dense = dequantize(base).float()
    merged = dense.clone()
    idx = layer.delta_indices.long().to(merged.device)
    merged.view(-1)[idx] += layer.delta_values.detach().float().to(merged.device)
    dtype = dtype or float_dtype(base)
    if not requantize:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                           device=merged.device, dtype=dtype)
        linear.weight.copy_(merged)
        if base.bias is not None:
            linear.bias.copy_(base.bias.detach())
        return linear.requires_grad_(False), None
    new = quantize_like(base, merged, config)
    got = dequantize(new).float()
    # re-quantizing a dequantized weight is not the identity (block scales are recomputed): what the
    # deltas did through quantization is measured against re-quantizing the base alone
    floor = dequantize(quantize_like(base, dense, config)).float().view(-1)[idx]
    delta = layer.delta_values.detach().float().to(merged.device)
    delta_sq = max(float(delta.pow(2).sum()), 1e-30)
    report = {"max_abs_error": float((got - merged).abs().max()),
              "error_over_delta": float((got - merged).norm()) / delta_sq ** 0.5,
              "delta_retained": float(((got.view(-1)[idx] - floor) * delta).sum()) / delta_sq,
              "positions_changed": float((got.view(-1)[idx] != floor).float().mean())}
    return new, report


def _requantization_summary(report: dict[str, dict]) -> str:
    if not report:
        return "requantize: no quantized layer"
    worst = max(report, key=lambda n: report[n]["error_over_delta"])
    changed = [r["positions_changed"] for r in report.values()]
    return (f"re-quantizing {len(report)} merged layers: on average {100 * sum(changed) / len(changed):.0f}% of the "
            f"tuned positions hold a different quantized value than the base re-quantized alone (min "
            f"{100 * min(changed):.0f}%); the weight error against W + S kept apart is up to "
            f"{report[worst]['error_over_delta']:.2f}x the deltas' own norm ({worst}). Keep the adapter unmerged "
            f"(or merge to a float model) to apply the deltas exactly; per-layer numbers: requantization_report")


def check_whole_state_dict(module: nn.Module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a patched model: every APET layer's entries and every tensor's
    shape are checked before any module copies anything, so a failed load changes nothing."""
    for name, sub in module.named_modules(remove_duplicate=False):
        sub_prefix = f"{prefix}{name}." if name else prefix
        if isinstance(sub, SparseDeltaLinear):
            sub.upgrade_state_dict(state_dict, sub_prefix)
            sub.check_state_dict(state_dict, sub_prefix)
        tensors = list(sub._parameters.items()) + [(n, b) for n, b in sub._buffers.items()
                                                   if n not in sub._non_persistent_buffers_set]
        for pname, mine in tensors:
            theirs = state_dict.get(sub_prefix + pname)
            if mine is None or not torch.is_tensor(theirs) or nn.parameter.is_lazy(mine):
                continue
            if theirs.shape != mine.shape and not (mine.dim() == 0 and tuple(theirs.shape) == (1,)):
                raise RuntimeError(f"size mismatch for {sub_prefix}{pname}: copying a param with shape "
                                   f"{tuple(theirs.shape)} from checkpoint, the shape in current model is "
                                   f"{tuple(mine.shape)} (nothing was loaded)")


def _targeted(name: str, config: ApetConfig) -> bool:
    """Whether ``config`` targets the module called ``name`` (find_targets also leaves out the output
    embeddings under "all-linear", by identity)."""
    if config.target_modules == "all-linear":
        ok = not any(part in HEAD_NAMES for part in name.split("."))
    else:
        ok = _matches(name, config.target_modules)
    return ok and not (_matches(name, config.exclude_modules) or _matches(name, config.modules_to_save))


def _layer_budget(model: nn.Module, config: ApetConfig, modules: dict[str, nn.Module],
                  shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Each target's K: the config's budget (budget_like, num_params or density) split by size."""
    if config.budget_like is not None:
        return split_budget(shapes, num_params=budget_like_count(model, config.budget_like, modules))
    return split_budget(shapes, num_params=config.num_params, density=config.density)


def _trainer_save_frame():
    """The frame of transformers' ``Trainer._save`` if it is what asks for this state dict, else None."""
    import sys
    frame = sys._getframe(2)  # 0: here, 1: ApetModel.state_dict, 2: its caller
    name = frame.f_globals.get("__name__", "")
    return frame if frame.f_code.co_name == "_save" and name.startswith("transformers.trainer") else None


def _adapter_checkpoint_missing_keys(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of an ApetModel: a checkpoint_state_dict lacks the frozen weights by
    design; only trainable parameters and positions it lacks are reported missing."""
    if not module.__dict__.pop("_loading_checkpoint_state", False):
        return
    needed = {n for n, p in module.named_parameters() if p.requires_grad}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k in needed or k.endswith(".delta_indices")]


def _note_checkpoint_state(module: nn.Module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of an ApetModel: is this a checkpoint_state_dict (deltas, no frozen weight)?"""
    if prefix:
        return
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    module._loading_checkpoint_state = any(k.endswith(".delta_values") for k in state_dict) and \
        not any(k in frozen for k in state_dict)


def _remove_load_check(module: nn.Module) -> None:
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", None) is check_whole_state_dict]:
        del hooks[key]


def _check_targets(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    if isinstance(model, ApetModel) or any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ValueError("this model already has APET layers (unload() them first)")
    owners: dict[int, str] = {}
    for name, module in targets.items():
        other = owners.setdefault(id(module.weight), name)
        if other != name:
            raise ValueError(f"target modules {other!r} and {name!r} share one weight: two deltas on one weight "
                             f"cannot both be applied; exclude one of them (exclude_modules)")


def _patch(model: nn.Module, config: ApetConfig, indices: dict[str, torch.Tensor]) -> ApetModel:
    """Patch the targets; if anything fails, the model is left exactly as it was."""
    targets = {name: model.get_submodule(name) for name in indices}
    _check_targets(model, targets)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    shared = _shared_parameter_ids(model)
    saved_modules = {n: p.detach().clone() for n, p in model.named_parameters()
                     if _within(n.rpartition(".")[0], config.modules_to_save)}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in saved_modules)
        replace_linears(model, lambda name, module: SparseDeltaLinear.from_linear(
            module, indices=indices[name], strategy=config.strategy, backend=config.backend,
            weight_shared=id(module.weight) in shared), targets)  # tied: the merged strategy must not write it
    except BaseException:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        raise
    config.layers = {name: {"shape": list(linear_shape(module)), "k": int(indices[name].numel()),
                            "checksum": index_checksum(indices[name])} for name, module in targets.items()}
    return ApetModel(model, config, requires_grad, saved_modules)


def get_apet_model(model: nn.Module, config: ApetConfig, calibration: Iterable | None = None,
                   loss_fn: Callable | None = None) -> ApetModel:
    """Replace the target linears of ``model`` in place with SparseDeltaLinear layers.

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
    targets = find_targets(model, config)
    shapes = {name: linear_shape(m) for name, m in targets.items()}
    budget = _layer_budget(model, config, targets, shapes)
    if config.method == "gradient":
        if calibration is None:
            raise ValueError("method='gradient' chooses positions from data: pass calibration=<iterable of batches>")
        scores = GradientScores(model, targets, budget, score=config.gradient_score, pool_factor=config.pool_factor,
                                backend=config.backend)
        scores.accumulate(calibration, loss_fn)
        indices = scores.indices()
    elif config.method == "magnitude":
        indices = {name: magnitude_indices(float_weight_oi(m), budget[name]) for name, m in targets.items()}
    else:
        if calibration is not None:
            raise ValueError(f"calibration data are only used by method='gradient', not {config.method!r}")
        indices = {name: select_indices(shapes[name], budget[name], method=config.method, seed=config.seed,
                                        key=name) for name in targets}
    return _patch(model, config, indices)


def _weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear-like module's weight as (out, in), a view for GPT-2's Conv1D."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def load_apet(model: nn.Module, directory: str, *, strict: bool = False, backend: str = "auto",
              adapter_name: str | None = None) -> ApetModel:
    """Patch a fresh base ``model`` with the adapter in ``directory`` (safetensors + JSON only).

    Everything is checked before the model is touched: the modules exist and have the stored
    shapes, regenerated indices match their checksums, every tensor is present with the right
    shape and finite. The first mismatch raises a ValueError naming it, and the model stays as
    it was. If the base weights at the tuned positions differ from those the adapter was saved
    over (its fingerprints), this warns naming the layers, or raises with ``strict=True``.
    ``backend`` is a runtime choice (not stored in the adapter).

    ``adapter_name``: ``model`` is an ApetModel, and the adapter is added to it under that name, inactive
    (``set_adapter`` applies it); its layers must be among the model's APET layers.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if adapter_name is not None:
        if not isinstance(model, ApetModel):
            raise ValueError("adapter_name= adds an adapter to an ApetModel; load the first one with "
                             "load_apet(base_model, path)")
        model._require_patched("load_apet(..., adapter_name=)")
        model._check_new_name(adapter_name)
        apet_layers = model.apet_layers()
        modules = apet_layers
        shape_of, base_at = (lambda m: (m.out_features, m.in_features)), (lambda m, idx: m.base_values_at(idx))
    elif isinstance(model, ApetModel) or any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ValueError("load_apet needs a base model without APET layers (call unload() first), or "
                         "adapter_name= to add the adapter to an ApetModel")
    else:
        modules = dict(model.named_modules())
        shape_of, base_at = linear_shape, weight_at
    config = ApetConfig.from_pretrained(directory)
    config.backend = ApetConfig(num_params=0, backend=backend).backend  # validated like any config
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is truncated or malformed: {exc}") from None
    indices, expected, foreign_base, requantized = {}, set(), [], []
    for name, info in config.layers.items():
        module = modules.get(name)
        if module is None or not (adapter_name is not None or is_linear_like(module)):
            raise ValueError(f"adapter layer {name!r} is not a linear layer of this model"
                             + (" with APET layers (added adapters tune a subset of them)" if adapter_name else ""))
        shape = shape_of(module)
        if list(shape) != list(info["shape"]):
            raise ValueError(f"adapter layer {name!r} has shape {tuple(info['shape'])}, the model's is {shape}")
        key = f"{name}.delta_indices"
        if key not in tensors and config.method in METHODS and info.get("positions") != "stored":
            # seeded positions: regenerated, and checked against the stored checksum below
            idx = select_indices(shape, int(info["k"]), method=config.method, seed=config.seed, key=name)
        else:
            if key not in tensors:
                raise ValueError(f"{path} lacks {key}")
            idx = tensors[key]
            try:
                check_index_meta(idx, shape[0] * shape[1])
                check_index_content(idx, shape[0] * shape[1])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: {key}: {exc}") from None
            expected.add(key)
        if idx.numel() != int(info["k"]) or index_checksum(idx) != info["checksum"]:
            raise ValueError(f"adapter layer {name!r}: indices do not match the stored checksum "
                             f"(other seed, key or selection code?)")
        values = tensors.get(f"{name}.delta_values")
        if values is None or values.shape != (idx.numel(),) or not values.is_floating_point():
            raise ValueError(f"{path}: {name}.delta_values is missing or not a float tensor of shape ({idx.numel()},)")
        expected.add(f"{name}.delta_values")
        stored = info.get("base_fingerprint")
        if stored is not None and not module.weight.is_meta:
            base = base_at(module, idx)
            if base_fingerprint(base) != stored:
                quant = quantization_of(module)
                quant = str(quant) if quant is not None else None
                sketch = info.get("base_sketch")
                if quant != info.get("base_quantization") and sketch is not None \
                        and sketch_distance(base_sketch(base), sketch) <= SKETCH_QUANTIZATION_ONLY:
                    requantized.append(f"{name} ({info.get('base_quantization') or 'float'} -> {quant or 'float'})")
                else:
                    foreign_base.append(name)
        indices[name] = idx
    params = dict(model.named_parameters()) if adapter_name is None else {}
    for key, t in tensors.items():
        if key in expected:
            continue
        if key not in params or not _within(key.rpartition(".")[0], config.modules_to_save):
            raise ValueError(f"{path} holds {key!r}, which is neither an APET layer nor a parameter of "
                             f"modules_to_save in this model")
        if params[key].shape != t.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, the model's is {tuple(params[key].shape)}")
    for key, t in tensors.items():
        check_finite(t, f"{path}: {key}")
    if requantized:
        warnings.warn(f"the base differs from the one the adapter was trained on only by quantization in "
                      f"{len(requantized)} of {len(config.layers)} adapter layers ({_first_few(requantized)}): its "
                      f"weights at the tuned positions are a quantized (or dequantized) copy of those, so the "
                      f"deltas apply on a slightly different base")
    if foreign_base:
        shown = _first_few(foreign_base)
        message = (f"base fingerprint mismatch in {len(foreign_base)} of {len(indices)} adapter layers ({shown}): "
                   f"this model's weights at the tuned positions differ from those the adapter was trained on")
        if strict:
            raise ValueError(message + " (strict=True)")
        warnings.warn(message)
    if adapter_name is not None:
        entries = {}
        for n, m in apet_layers.items():
            idx = indices.get(n, torch.empty(0, dtype=m.delta_indices.dtype))
            values = tensors.get(f"{n}.delta_values", torch.zeros(0)).float()
            entries[n] = (idx.to(m.delta_indices.device), values.to(m.delta_values.device))
        model._inactive[adapter_name] = (config, entries)
        return model
    apet = _patch(model, config, indices)
    try:
        layers = apet.apet_layers()
        with torch.no_grad():
            for key, t in tensors.items():
                if key.endswith(".delta_values") and key[: -len(".delta_values")] in layers:
                    layers[key[: -len(".delta_values")]].delta_values.copy_(t)
                elif not key.endswith(".delta_indices"):
                    params[key].copy_(t)
    except BaseException:
        apet.unload()
        raise
    return apet
