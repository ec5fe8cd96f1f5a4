"""Drop-in modules: SparseDeltaLinear (sparse APET) and DenseMaskLinear (the dense-mask baseline).

A SparseDeltaLinear holds every adapter it applies as module state, PEFT-style: ``deltas`` maps an
adapter name to a ``DeltaSet`` (its K positions and the base weight's values there, buffers, and its fp32
values, a Parameter), so ``.to()``, state dicts, DCP checkpoints, DDP/FSDP and deep copies see all of them.
One adapter is active (applied and trained); others may be applied with it, untrained (``active_adapters``),
or per batch row (``mixed_batch``). State-dict keys: ``deltas.<name>.values``, ``.indices``, ``.base`` and
``.merged`` (whether the weight saved beside it holds that adapter's W + S), ``base_layer.*``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ._checks import check_finite, check_index_content, check_index_meta, validation_from_env
from .errors import ApetStateError, ApetTypeError, ApetValueError
from .linear_like import is_conv1d, linear_shape, merge_is_legal, stored_weight
from .load_guard import already_checked, check_strict_keys
from .base_weight import BaseWeight
from .ops.dispatch import CHOICES, implementation, resolve
from .ops.layout import DeltaLayout, build_layout
from .optimizer_guard import note_active_values
from .quantized import float_dtype, quantization_of, values_at
from .selection import index_checksum, index_dtype, select_indices
from .sharded import assign_full, is_dtensor
from .strategies import BY_NAME, DEQUANTIZED, MERGED, UNMERGED

STRATEGIES = ("auto", "merged", "unmerged", "dequantized")
DEFAULT_ADAPTER = "default"

# id(weight Parameter) -> (weak) the SparseDeltaLinear wrapping it. Two wrappers over one weight would
# both write it in the merged strategy and neither could restore it. Keyed by id, validated by identity on
# lookup: no weak reference to the tensor itself, which torch.utils.swap_tensors (the .to() of tensor
# subclasses such as torchao's quantized weights) refuses to swap.
_OWNERS: dict[int, weakref.ref] = {}


def _owner_of(weight: torch.Tensor):
    ref = _OWNERS.get(id(weight))
    owner = ref() if ref is not None else None
    return owner if owner is not None and owner.weight is weight else None


# the memory of each wrapped weight (its address) -> a layer over it: two models can share one weight's memory
# without sharing the Parameter (load_state_dict(..., assign=True) from one into the other), and a merged layer
# writes W + S there for both
_MEMORY: dict[int, weakref.ref] = {}


def _address(weight: torch.Tensor) -> int | None:
    if not isinstance(weight, torch.Tensor) or weight.is_meta or type(weight).__name__ == "DTensor":
        return None
    try:
        return weight.data_ptr() or None
    except RuntimeError:  # (a tensor subclass without storage)
        return None


def _memory_owner(weight: torch.Tensor, other_than=None):
    """A live APET layer, other than ``other_than``, whose weight lies at the same memory as ``weight``."""
    address = _address(weight)
    ref = _MEMORY.get(address) if address is not None else None
    owner = ref() if ref is not None else None
    if owner is None or owner is other_than or _address(owner.weight) != address:
        return None
    return owner


def _refuse_memory_of_a_merged_layer(weight: torch.Tensor, merged_here: bool, other_than=None) -> bool:
    """Whether ``weight``'s memory is another live layer's weight; refused where either of the two runs merged (one
    would write its W + S into the other's weight)."""
    owner = _memory_owner(weight, other_than)
    if owner is not None and (owner._strategy.holds_sum or merged_here):
        raise ApetValueError("this weight's memory is also the weight of another model's APET layer (tensors shared "
                             "between two models, as load_state_dict(..., assign=True) from one into the other "
                             "makes them), and a merged layer writes W + S into it: give this model its own copy "
                             "(load a cloned state dict, or without assign=True), or run both with "
                             "strategy='unmerged'")
    return owner is not None


def _budget(numel: int, k: int | None, density: float | None) -> int:
    if (k is None) == (density is None):
        raise ApetValueError("give exactly one of k or density")
    if k is None:
        if not 0.0 <= density <= 1.0:
            raise ApetValueError(f"density must lie in [0, 1], got {density}")
        k = round(density * numel)
    return k


def check_adapter_name(name) -> None:
    """Adapter names are module names (state-dict keys hold them): non-empty, no dots."""
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise ApetValueError(f"adapter names are non-empty strings without dots (and not '__base__'), got {name!r}")


def known_adapters(names, present, holder: str, what: str = "set_adapter") -> list[str]:
    """``names`` (a name or a list) as a list of distinct names among ``present`` (the adapters of a layer or of a
    model: ``holder`` says which, for the message)."""
    listed = [names] if isinstance(names, str) else list(names)
    if not listed or len(set(listed)) != len(listed):
        raise ApetValueError(f"{what} takes an adapter name or a list of distinct names, got {names!r}")
    unknown = [n for n in listed if n not in present]
    if unknown:
        raise ApetValueError(f"no adapter named {unknown[0]!r}; this {holder} has {list(present)}")
    return listed


class DeltaSet(nn.Module):
    """One adapter's deltas on one layer: K sorted, unique flat row-major positions (``indices``) and
    their fp32 ``values``, with the orderings the kernels walk (non-persistent buffers built when the
    positions change, never in a forward; the column order, 4 bytes per delta, only where an
    unmerged backward needs it)."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], device: torch.device, columns: bool,
                 base_dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(shape)
        self.columns = columns
        # on the meta device the buffers hold no data; the positions wait on the host until they do
        self.host_indices = indices.detach().to("cpu").clone() if device.type == "meta" else None
        self.register_buffer("indices", indices.detach().to(device).clone())
        # the base weight's own values at the positions (read by the layer from the pure W), and whether a weight
        # saved in the same state dict holds W + S of this adapter (set when a state dict is taken)
        self.register_buffer("base", torch.empty(indices.numel(), dtype=base_dtype, device=device))
        self.register_buffer("merged", torch.zeros((), dtype=torch.bool, device=device))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device),
                                   requires_grad=False)
        self.rebuild_layout()

    @property
    def k(self) -> int:
        return self.indices.numel()

    def rebuild_layout(self, columns: bool | None = None) -> None:
        if columns is not None:
            self.columns = columns
        layout = build_layout(self.indices, self.shape, columns=self.columns)
        for name, t in zip(("row_ptr", "col_ptr", "col_perm"), layout):
            self.register_buffer(name, t, persistent=False)

    @property
    def layout(self) -> DeltaLayout:
        return DeltaLayout(self.row_ptr, self.col_ptr, self.col_perm)

    def _apply(self, fn, recurse=True):
        was_meta = self.indices.is_meta
        result = super()._apply(fn, recurse)
        if was_meta and not self.indices.is_meta and self.host_indices is not None:
            with torch.no_grad():  # to_empty(): the buffers hold garbage; the positions come back
                self.indices = self.host_indices.to(self.indices.device)
                self.values.zero_()
            self.host_indices = None
            self.rebuild_layout()
        return result

    def extra_repr(self) -> str:
        return f"k={self.k}"


# state-dict keys of 0.1 layers (one adapter, flat keys) -> where they live now
_LEGACY_BASE_KEYS = ("weight", "bias")
_LEGACY_DELTA_KEYS = {"delta_values": "values", "delta_indices": "indices", "delta_base": "base"}


class SparseDeltaLinear(nn.Module, BaseTunerLayer):
    """A linear layer with K tunable scalars at arbitrary positions of its frozen weight.

    ``base_layer`` is the wrapped layer itself (``nn.Linear``, GPT-2 ``Conv1D``, or any module
    computing ``x W^T + b`` with a ``.weight`` of shape (out, in)), frozen; ``weight`` and ``bias``
    are its parameters. ``deltas[name]`` holds each adapter's positions and fp32 values (zeros at the
    start); ``delta_values`` / ``delta_indices`` are the active adapter's, the only trainable tensor.

    The dense part of the forward is always the base layer's own call; the sparse part is one op.
    Strategies: ``merged`` (plain float nn.Linear / Conv1D only) keeps W + S in W's storage, so the forward
    is exactly the base layer's and only the SDDMM in the backward is extra (apet_kernels.merged_weight says
    what W holds when). ``unmerged`` never writes W:
    ``y = base_layer(x) + x S^T``. ``auto`` merges where legal. Under autocast (or a base layer that
    computes in another dtype) the sparse term takes x in the dtype of the base layer's output, as a
    dense ``F.linear(x, W + S)`` would.
    """

    _apet_layer = True  # (what apet_kernels.load_guard looks for)
    # PEFT's tuner-layer interface (apet_kernels.tuner): every adapter's tensors live under ``deltas``
    adapter_layer_names = ("deltas",)

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, *, strategy: str = "auto",
                 backend: str = "auto", weight_shared: bool = False, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        if isinstance(base_layer, SparseDeltaLinear):
            raise ApetTypeError("this module is already a SparseDeltaLinear: wrapping it again would merge a second "
                                "delta into the same weight (unmerge or unload the first one)")
        if strategy not in STRATEGIES:
            raise ApetValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        if backend not in CHOICES:
            raise ApetValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")
        check_adapter_name(adapter_name)
        weight = getattr(base_layer, "weight", None)
        quantized = quantization_of(base_layer) is not None
        if not isinstance(weight, torch.Tensor) or (weight.dim() != 2 and not quantized):
            raise ApetTypeError(f"{type(base_layer).__name__} has no 2-D .weight: not a linear layer")
        self.out_features, self.in_features = linear_shape(base_layer)
        numel = self.out_features * self.in_features
        check_index_meta(indices, numel)
        check_index_content(indices, numel)
        _check_not_wrapped(weight)
        shared_memory = _refuse_memory_of_a_merged_layer(weight, strategy == "merged")
        legal, why = merge_is_legal(base_layer, weight_shared or shared_memory)
        if strategy == "merged" and not legal:
            raise ApetValueError(f"strategy 'merged' is not legal here: {why}")
        if strategy == "dequantized" and not quantized:
            raise ApetValueError("strategy 'dequantized' scatters the deltas into a quantized base's dequantized weight, "
                             "and this layer's weight is not quantized (use 'merged' or 'auto')")
        # nothing above changed anything: from here on the construction cannot fail
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.weight_transposed = is_conv1d(base_layer)  # GPT-2's Conv1D: we work on the (out, in) view
        self.weight_shared = weight_shared  # a module flag: survives deepcopy and pickling
        self.backend = backend
        self._strategy = BY_NAME[strategy if strategy != "auto" else (
            "merged" if legal else "dequantized" if quantized else "unmerged")]
        # "auto" chose merged for speed alone: such a layer unmerges by itself where several adapters apply (set
        # together, a mixed batch) and merges again after; an explicit "merged" refuses those instead
        self._auto_merged = strategy == "auto" and self._strategy is MERGED
        self._unmerged_for_now = False  # unmerged by the rule above, to merge again when one adapter applies
        self.merged_adapters: list[str] = []  # PEFT's record of merge_adapter() (not of the merged strategy)
        self.apet_disabled = False  # True: behave as the wrapped layer (see ApetModel.disable_apet)
        self.deltas = nn.ModuleDict()
        self._active_adapter = [adapter_name]  # the active one first, then others applied with it (unmerged)
        self._mixed = None  # a MixedBatch while a mixed-adapter batch runs (ApetModel.mixed_batch)
        # adapter -> checksum of placeholder positions that a checkpoint's indices must replace (expect_positions)
        self._awaited: dict[str, str] = {}
        # a quantized base: W's values are its dequantized ones, in the dtype it was quantized from
        self.base_dtype = float_dtype(base_layer) if quantized else weight.dtype
        self.deltas[adapter_name] = DeltaSet(indices, (self.out_features, self.in_features), weight.device,
                                             columns=self._strategy.columns, base_dtype=self.base_dtype)
        self._set_active_cache()
        # K = 0: nothing to train. An empty trainable tensor gets an empty gradient, which FSDP2's reduce-scatter
        # refuses (_chunk_cat expects non-empty tensors; issue 33)
        self.delta_values.requires_grad_(self._active.k > 0)
        self._weight = BaseWeight(self)  # W at the positions (the merged strategy's own state: merged_weight)
        self._weight.read_base()
        self._claim_weight()
        self._register_load_state_dict_pre_hook(self._before_load)
        self.register_load_state_dict_post_hook(SparseDeltaLinear._after_load)
        self.register_state_dict_pre_hook(SparseDeltaLinear._before_state_dict)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Module, k: int | None = None, density: float | None = None,
                    method: str = "random", seed: int = 0, key: str | None = None,
                    strategy: str = "auto", backend: str = "auto", indices: torch.Tensor | None = None,
                    weight_shared: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> "SparseDeltaLinear":
        """Wrap ``linear`` (``nn.Linear``, GPT-2 ``Conv1D`` or another linear-like layer).

        Positions come from ``select_indices(..., method, seed, key)`` with ``k`` or
        ``density``, or are given directly as ``indices``. ``weight_shared=True`` marks a weight
        that other modules use too (tied embeddings): such a layer never merges.
        """
        if isinstance(linear, SparseDeltaLinear):
            raise ApetTypeError("this module is already a SparseDeltaLinear: wrapping it again would merge a second "
                                "delta into the same weight (unmerge or unload the first one)")
        shape = linear_shape(linear)
        if indices is None:
            k = _budget(shape[0] * shape[1], k, density)
            indices = select_indices(shape, k, method=method, seed=seed, key=key or "")
        elif k is not None or density is not None:
            raise ApetValueError("give either indices or a budget (k / density), not both")
        return cls(linear, indices, strategy=strategy, backend=backend, weight_shared=weight_shared,
                   adapter_name=adapter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def weight_oi(self) -> torch.Tensor:
        return self.weight.t() if self.weight_transposed else self.weight

    # ----------------------------------------------------------------- the active adapter's tensors
    @property
    def active_adapter(self) -> str:
        """The adapter trained (and applied)."""
        if not self._active_adapter:
            raise ApetStateError("this layer has no adapter (the last one was deleted): add one and set_adapter() it")
        return self._active_adapter[0]

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter, then others applied with it (unmerged)."""
        return list(self._active_adapter)

    def _set_active_cache(self) -> None:
        # a plain attribute (not a registered submodule): the forward reads it without nn.Module lookups
        self.__dict__["_active"] = self.deltas[self.active_adapter]

    @property
    def delta_values(self) -> nn.Parameter:
        return self._active.values

    @delta_values.setter
    def delta_values(self, value: nn.Parameter) -> None:
        if not isinstance(value, nn.Parameter) or tuple(value.shape) != (self._active.k,):
            raise ApetTypeError(f"delta_values must be an nn.Parameter of shape ({self._active.k},)")
        self._active.values = value

    def __setattr__(self, name, value):
        if name == "delta_values":  # (nn.Module would register a Parameter under that name instead)
            type(self).delta_values.fset(self, value)
        else:
            super().__setattr__(name, value)

    @property
    def delta_indices(self) -> torch.Tensor:
        return self._active.indices

    @property
    def delta_base(self) -> torch.Tensor:
        """W's own values at the active adapter's positions (its ``base`` buffer)."""
        return self._active.base

    @property
    def layout(self) -> DeltaLayout:
        return self._active.layout

    @property
    def index_device(self) -> torch.device:
        """Where this layer's positions live (the weight's device; a layer may hold no adapter)."""
        first = next(iter(self.deltas.values()), None)
        return first.indices.device if first is not None else self.weight.device

    def empty_indices(self) -> torch.Tensor:
        """K = 0 positions of this layer's index dtype (an adapter that tunes nothing here)."""
        return torch.empty(0, dtype=index_dtype(self.out_features * self.in_features))

    @property
    def adapters(self) -> list[str]:
        return list(self.deltas.keys())

    # ----------------------------------------------------------------- the weight and its wrapper
    def __setstate__(self, state):
        # deepcopy and unpickling give this module new parameters: it wraps its own new weight
        state.setdefault("_auto_merged", False)  # (pickled by 0.3.0)
        state.setdefault("_unmerged_for_now", False)
        state.setdefault("merged_adapters", [])
        super().__setstate__(state)
        self._claim_weight()

    def _claim_weight(self) -> None:
        # the Parameter this layer merges into; another one at a forward means an engine re-gathers it (FSDP2)
        self.__dict__["_own_weight"] = self.base_layer._parameters.get("weight")
        key = id(self.weight)

        def forget(ref, key=key):
            if _OWNERS.get(key) is ref:
                del _OWNERS[key]
        _OWNERS[key] = weakref.ref(self, forget)
        address = _address(self.weight)
        if address is not None:
            def forget_memory(ref, address=address):
                if _MEMORY.get(address) is ref:
                    del _MEMORY[address]
            _MEMORY[address] = weakref.ref(self, forget_memory)

    def release_weight(self) -> None:
        """Forget that this layer wraps its weight (after unloading), so it can be wrapped again."""
        if _owner_of(self.weight) is self:
            del _OWNERS[id(self.weight)]
        if _memory_owner(self.weight) is self:
            del _MEMORY[_address(self.weight)]

    @property
    def quantization(self):
        """The base weight's quantization (apet_kernels.quantized.Quantization), or None."""
        return quantization_of(self.base_layer)

    def merge_legality(self) -> tuple[bool, str]:
        shared = self.weight_shared or _memory_owner(self.weight, other_than=self) is not None
        return merge_is_legal(self.base_layer, shared)

    def _backend_name(self) -> str:
        return resolve(self.backend, self.weight.device)

    def current_base(self) -> torch.Tensor:
        """W's own values at the active adapter's positions (``delta_base``, read first if still unread)."""
        return self._weight.base()

    @property
    def strategy(self) -> str:
        """The name of the strategy this layer runs (apet_kernels.strategies): merged, unmerged or dequantized."""
        return self._strategy.name

    @property
    def applies_several(self) -> bool:
        """Whether this layer can apply several adapters at once (their terms added) or one per batch row (an
        "auto" layer unmerges for that by itself)."""
        return self._strategy.applies_several or self._switches_itself

    def _become(self, strategy) -> None:
        self._strategy = strategy
        self._active.rebuild_layout(columns=strategy.columns)

    @torch.no_grad()
    def bake(self) -> None:
        """W[p] = cast(base + v) for good (merge_and_unload): whatever the strategy, W then holds W + S."""
        MERGED.bake(self)

    # ----------------------------------------------------------------- strategy
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Switch to the merged strategy and write W + S into W's storage now (over a quantized base: to the
        dequantized strategy, S scattered into the weight each GEMM dequantizes; nothing is written).

        PEFT's signature and record: ``adapter_names`` (default: the active ones) may only name the active adapter
        (one adapter is merged at most); merging it again warns as PEFT does; ``safe_merge`` checks its values
        are finite first; ``merged_adapters`` lists it until ``unmerge``. The adapter stays trainable and
        separable: ``unmerge`` restores W bit-exactly."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(self.active_adapters) > 1 and adapter_names == self.active_adapters:
            raise ApetStateError("cannot merge: other adapters are applied together with this one (unmerged); "
                                 "set_adapter() a single adapter first")
        if list(adapter_names) != [self.active_adapter]:
            raise ApetValueError(f"an APET layer merges its active adapter only ({self.active_adapter!r}), not "
                             f"{list(adapter_names)}: set_adapter() the one to merge first")
        if safe_merge:
            check_finite(self.delta_values.detach(), f"adapter {self.active_adapter!r} values")
        if self.quantization is not None:  # (a shared quantized weight too: it is never written)
            if self._strategy is UNMERGED:
                self._become(DEQUANTIZED)
            self.merged_adapters = [self.active_adapter]
            return
        legal, why = self.merge_legality()
        if not legal:
            raise ApetStateError(f"cannot merge: {why}")
        if len(self.active_adapters) > 1:
            raise ApetStateError("cannot merge: other adapters are applied together with this one (unmerged); "
                                 "set_adapter() a single adapter first")
        if self._mixed is not None:
            raise ApetStateError("cannot merge inside a mixed-adapter batch")
        if self._strategy is not MERGED:
            MERGED.enter(self)
            self._become(MERGED)
        self._unmerged_for_now = False
        self.merged_adapters = [self.active_adapter]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W bit-exactly from ``delta_base`` and switch to the unmerged strategy."""
        if self._strategy is MERGED:
            MERGED.leave(self)
        if self._strategy is not UNMERGED and self._active_adapter:
            self._become(UNMERGED)  # (the unmerged backward walks the deltas by column too)
        elif self._strategy is not UNMERGED:
            self._strategy = UNMERGED
        self._unmerged_for_now = False
        self.merged_adapters = []

    @property
    def _switches_itself(self) -> bool:
        """An "auto" layer running merged for speed, not merged by merge_adapter(): it unmerges by itself where
        several adapters apply."""
        return self._auto_merged and not self.merged_adapters

    @torch.no_grad()
    def _unmerge_for_several(self, why: str) -> None:
        """Before several adapters apply at once (set together, a mixed batch): unmerged, or refused."""
        if self._strategy.applies_several:
            return
        if not self._switches_itself:
            raise ApetValueError(f"{why} add their sparse terms unmerged, and this layer is merged (strategy="
                                 f"'merged' or merge_adapter()): unmerge() it or use strategy='unmerged' or 'auto'")
        self.unmerge()
        self._unmerged_for_now = True

    @torch.no_grad()
    def _merge_again(self) -> None:
        """After the rule above: merged again once one adapter applies."""
        if self._unmerged_for_now and len(self._active_adapter) == 1 and self._mixed is None \
                and self.merge_legality()[0]:
            MERGED.enter(self)
            self._become(MERGED)
            self._unmerged_for_now = False
    # ----------------------------------------------------------------- adapters
    def _checked_indices(self, indices: torch.Tensor, what: str) -> None:
        numel = self.out_features * self.in_features
        try:
            check_index_meta(indices, numel)
            check_index_content(indices, numel)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}: {exc}") from None

    @torch.no_grad()
    def add_adapter(self, name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Add an inactive adapter with these positions (any K, even 0) and values (default zeros)."""
        check_adapter_name(name)
        if is_dtensor(stored_weight(self.base_layer)):
            # fully_shard takes the parameters it reduces when it is called: new values would train unreduced,
            # every rank on its own (issue 33: ranks ended 0.3 apart after 3 steps, silently)
            raise ApetStateError(f"adapter {name!r}: this layer's weight is sharded (FSDP2 fully_shard), and values "
                                 "added now would train without gradient reduction. Add or load adapters before "
                                 "fully_shard")
        if name in self.deltas:
            raise ApetValueError(f"this layer has an adapter named {name!r} already")
        self._checked_indices(indices, f"adapter {name!r}")
        if values is not None:
            if tuple(values.shape) != (indices.numel(),) or not values.is_floating_point():
                raise ApetValueError(f"adapter {name!r}: values must be a float tensor of shape ({indices.numel()},), "
                                 f"got {values.dtype} {tuple(values.shape)}")
            check_finite(values, f"adapter {name!r} values")
        device = self.index_device
        delta = DeltaSet(indices, (self.out_features, self.in_features), device, columns=True,
                         base_dtype=self.base_dtype)
        if not delta.indices.is_meta and not self.weight.is_meta:
            delta.base.copy_(self.base_values_at(delta.indices))
        if values is not None:
            delta.values.copy_(values)
        self.deltas[name] = delta

    def delete_adapter(self, name: str) -> None:
        """As PEFT's layers: deleting an active adapter leaves the other active ones, or else activates the first
        remaining adapter (in name order, so every layer picks the same one). Deleting the last one leaves a
        layer that computes as its base layer (W restored bit-exactly), with no active adapter, until one is
        added and set active."""
        if name not in self.deltas:
            raise ApetValueError(f"no adapter named {name!r}; this layer has {self.adapters}")
        if name in self.merged_adapters:
            raise ApetValueError(f"Cannot delete adapter(s) [{name!r}] while they are merged. Please unmerge them "
                                 "first.")
        if self._mixed is not None:
            raise ApetStateError("delete_adapter() inside a mixed-adapter batch would change what its rows apply")
        if len(self.deltas) == 1:
            auto = self._switches_itself and self._strategy is MERGED
            self.unmerge()  # (W pure again; an "auto" layer merges the next adapter it applies)
            self._unmerged_for_now = auto
            del self.deltas[name]
            self._active_adapter = []
            self.__dict__["_active"] = None
            return
        if name in self.active_adapters:
            rest = [n for n in self.active_adapters if n != name] or [sorted(n for n in self.deltas if n != name)[0]]
            self.set_adapter(rest)
        del self.deltas[name]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """PEFT's hook after a load with ``assign=True`` (``low_cpu_mem_usage``): the adapter's tensors go to the
        base weight's device; their dtypes stay (PEFT's own would cast the fp32 values to W's dtype)."""
        target = torch.device(device) if device is not None else self.weight.device
        if adapter_name in self.deltas and target.type != "meta":
            self.deltas[adapter_name].to(target)

    # ----------------------------------------------------------------- PEFT's enable / disable
    @property
    def disable_adapters(self) -> bool:
        return self.apet_disabled

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch (``PeftModel.disable_adapter()``): disabled, the layer computes as its base layer, exactly
        (merged: around W + S, which stays in the weight); the values keep their ``requires_grad``, so a reference
        pass between a forward and its backward leaves that backward intact."""
        self.apet_disabled = not enabled

    @torch.no_grad()
    def set_adapter(self, names: str | list[str], inference_mode: bool = False) -> None:
        """Apply and train ``names[0]``, apply the others with it (unmerged only). Merged: W is restored at
        the old positions and cast(base + v) written at the new ones right away, nothing else is touched.
        Each adapter keeps its own values Parameter: switching back gives the same Parameters."""
        names = known_adapters(names, self.adapters, "layer")
        if len(names) > 1 and not self._strategy.applies_several and not self._switches_itself:
            raise ApetValueError("adapters active together add their sparse terms unmerged, and this layer is merged: "
                             "unmerge() it or use strategy='unmerged'")
        if self._mixed is not None:
            raise ApetStateError("set_adapter() inside a mixed-adapter batch would change what its rows apply")
        # checked: from here on nothing fails
        if len(names) > 1:
            self._unmerge_for_several("adapters active together")
        new = names[0]
        if not self._active_adapter:  # (the last adapter was deleted, and this one added since)
            self._active_adapter = [new]
            self._set_active_cache()
            self._weight.reread_base()
        old = self.active_adapter
        if new != old:
            with self._strategy.changing(self):  # (merged: W restored at the old positions, W + S at the new)
                self._active_adapter = [new, *self._active_adapter[1:]]
                self._set_active_cache()
                self._weight.reread_base()  # W is pure at the new positions
        for name in names if self._strategy.columns else names[1:]:
            if self.deltas[name].col_perm is None:  # an unmerged term's backward walks the deltas by column too
                self.deltas[name].rebuild_layout(columns=True)
        self._active_adapter = names
        self._merge_again()
        for name, delta in self.deltas.items():
            delta.values.requires_grad_(name == new and delta.k > 0 and not inference_mode)  # (K = 0: see __init__)
        note_active_values([self.delta_values], [d.values for n, d in self.deltas.items() if n != new])

    @torch.no_grad()
    def set_positions(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Tune K other positions (K unchanged) in the active adapter: W is restored at the old positions, the
        base read at the new ones, and ``values`` (default: zeros) written in place into ``delta_values``
        so an optimizer keeps its reference. Used by drop-and-regrow (apet_kernels.positions.Regrower)."""
        k = self.delta_indices.numel()
        check_index_meta(indices, self.out_features * self.in_features)
        if indices.numel() != k:
            raise ApetValueError(f"set_positions keeps K fixed: got {indices.numel()} positions, the layer has {k}")
        self._checked_indices(indices, "set_positions")
        if values is not None and tuple(values.shape) != (k,):
            raise ApetValueError(f"values must have shape ({k},), got {tuple(values.shape)}")
        with self._strategy.changing(self):
            self.delta_indices.copy_(indices.to(self.delta_indices.device, self.delta_indices.dtype))
            self._weight.reread_base()
            self._active.rebuild_layout()
            assign_full(self.delta_values, torch.zeros(k) if values is None else values)  # (FSDP2: each rank its own)

    # ----------------------------------------------------------------- positions that come with a checkpoint
    def expect_positions(self, adapter: str) -> None:
        """``adapter``'s positions are placeholders of the right K until a checkpoint's indices replace them (an
        adapter with stored positions, built from its saved config before its tensors are loaded). The layer
        writes nothing into W until then, and refuses a forward on the placeholders."""
        self._awaited[adapter] = index_checksum(self.deltas[adapter].indices)

    @torch.no_grad()
    def settle_positions(self) -> None:
        """Take up indices loaded by a loader that bypasses ``load_state_dict``'s hooks (transformers' own adapter
        loader assigns tensors directly): rebuild the orderings and read the base at the new positions (W is pure:
        nothing was written while they were awaited). Refuses if they never came."""
        for adapter, placeholder in list(self._awaited.items()):
            delta = self.deltas[adapter] if adapter in self.deltas else None
            if delta is None:
                del self._awaited[adapter]
                continue
            if delta.k and index_checksum(delta.indices) == placeholder:
                raise ApetStateError(f"adapter {adapter!r} stores its positions, and none were loaded into this layer: "
                                     "load its checkpoint (PeftModel.from_pretrained, load_adapter) before running it")
            delta.rebuild_layout()
            if adapter == self.active_adapter:
                self._weight.reread_base()
            else:
                delta.base.copy_(self.base_values_at(delta.indices))
            del self._awaited[adapter]

    @torch.no_grad()
    def base_values_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The base weight's values at any positions (dequantized if quantized), without unmerging: where a
        merged W holds W + S, the saved base is used."""
        if self.quantization is not None:
            return values_at(self.base_layer, indices)
        idx = indices.long().to(self.index_device)
        values = self._weight.get(idx).clone()
        if self._strategy.holds_sum and self.delta_indices.numel():
            mine = self.delta_indices.long()
            overlap = torch.isin(idx, mine)
            if overlap.any():
                values[overlap] = self.current_base()[torch.searchsorted(mine, idx[overlap])]
        return values

    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """Dense fp32 Delta W (out, in) of ``adapter`` (default: the active one). For inspection and merging
        only: allocates out x in."""
        delta = self.deltas[adapter] if adapter is not None else self._active
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=delta.values.device)
        dense.view(-1)[delta.indices.long()] = delta.values.detach().float()
        return dense

    # ----------------------------------------------------------------- device moves and meta init
    def _apply(self, fn, recurse=True):
        was_meta = self.weight.is_meta
        result = super()._apply(fn, recurse)
        self._strategy.after_move(self)  # dtype or storage may have changed (merged: write again)
        if was_meta and not self.weight.is_meta:
            self._weight.stale = True  # to_empty(): read the base once W holds data (a load or the next forward)
            self._claim_weight()  # a new Parameter object when it left the meta device
        return result

    # ----------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:  # missing / unexpected keys refused before anything is copied (torch reports them after)
            check_strict_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # Keys: base_layer.weight/bias and, for every adapter, deltas.<name>.values / .indices / .base / .merged. A
    # merged layer's weight is saved as W + S of its active adapter, whose ``merged`` flag says so; a load puts
    # the pure W back at that adapter's positions from the base saved with it, whatever adapter is active here.
    @staticmethod
    def _before_state_dict(module: "SparseDeltaLinear", prefix, keep_vars) -> None:
        merged = module._strategy.sum_in_state_dict(module)  # (merged: W + S synced for the values saved with it)
        with torch.no_grad():
            for name, delta in module.deltas.items():
                if not delta.merged.is_meta:
                    delta.merged.fill_(merged and name == module.active_adapter)

    def upgrade_state_dict(self, state_dict, prefix: str) -> None:
        """Move 0.1/0.2's flat keys (``weight``/``bias`` of an unpatched checkpoint; ``delta_values``,
        ``delta_indices``, ``delta_base`` of a one-adapter layer, whose saved weight held W + S when it came with
        a base) to where they live now, in place."""
        for name in _LEGACY_BASE_KEYS:
            old, new = prefix + name, prefix + "base_layer." + name
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        active = f"{prefix}deltas.{self.active_adapter}."
        for old, new in _LEGACY_DELTA_KEYS.items():
            if prefix + old in state_dict and active + new not in state_dict:
                state_dict[active + new] = state_dict.pop(prefix + old)
                if new == "base" and active + "merged" not in state_dict:
                    state_dict[active + "merged"] = torch.tensor(prefix + "base_layer.weight" in state_dict)

    def _incoming_merged(self, state_dict, prefix: str) -> str | None:
        """The adapter whose W + S the incoming weight holds, if it comes with one."""
        found = [n for n in self.deltas if bool(state_dict.get(f"{prefix}deltas.{n}.merged", False))]
        if len(found) > 1:
            raise ApetValueError(f"{prefix}deltas: several adapters ({found}) are marked merged; a weight holds one at most")
        return found[0] if found else None

    def check_state_dict(self, state_dict, prefix: str = "", assign: bool = False) -> None:
        """Everything load_state_dict would put in this layer, checked before anything is copied (``assign``: the
        incoming tensors become this layer's own)."""
        numel = self.out_features * self.in_features
        incoming = state_dict.get(f"{prefix}base_layer.weight")
        if assign and torch.is_tensor(incoming):
            _refuse_memory_of_a_merged_layer(incoming, self._strategy.holds_sum, other_than=self)
        for name in ("weight", "bias"):
            mine = getattr(self.base_layer, name, None)
            t = state_dict.get(f"{prefix}base_layer.{name}")
            if t is not None and mine is not None and torch.is_tensor(t) and t.shape != mine.shape:
                raise ApetValueError(f"{prefix}base_layer.{name} has shape {tuple(t.shape)}, this layer's is "
                                 f"{tuple(mine.shape)}")
        for adapter, delta in self.deltas.items():
            key = f"{prefix}deltas.{adapter}."
            idx = state_dict.get(key + "indices")
            vals = state_dict.get(key + "values")
            if delta.k and delta.indices.is_meta and idx is None and torch.is_tensor(vals) and not vals.is_meta:
                # (assign=True would give real values over positions that stay on meta: a silent base forward;
                # a copy into meta tensors loads nothing)
                raise ApetValueError(f"{key}values: this layer's positions are on the meta device and the state dict "
                                 f"carries none ({key}indices). Call model.to_empty(device=...) before loading "
                                 "(seeded positions are drawn there), or load a state dict that holds the indices")
            if idx is not None:
                try:
                    check_index_meta(idx, numel)
                    if idx.numel() != delta.k:
                        raise ApetValueError(f"it has {idx.numel()} entries, this layer has {delta.k}")
                    if not idx.is_meta:
                        check_index_content(idx, numel)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{key}indices: {exc}") from None
            _check_float_entry(state_dict.get(key + "values"), key + "values", delta.k, finite=True)
            _check_float_entry(state_dict.get(key + "base"), key + "base", delta.k, finite=False)
        merged = self._incoming_merged(state_dict, prefix)
        if merged is not None and f"{prefix}deltas.{merged}.base" not in state_dict:
            raise ApetValueError(f"{prefix}deltas.{merged}.merged says the weight holds W + S, but its base is missing")

    def _before_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self.upgrade_state_dict(state_dict, prefix)
        if not already_checked(error_msgs):  # (an ancestor checked the whole state dict: apet_kernels.load_guard)
            self.check_state_dict(state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
        incoming = {n for n in ("base_layer.weight",) if prefix + n in state_dict}
        incoming |= {n for n in self.deltas if f"{prefix}deltas.{n}.indices" in state_dict}
        self._incoming = (frozenset(incoming), self._incoming_merged(state_dict, prefix) if incoming else None)
        # the positions may move and the weight may be replaced: start from the pure W
        self._strategy.before_load(self)

    @staticmethod
    @torch.no_grad()
    def _after_load(module: "SparseDeltaLinear", incompatible_keys) -> None:
        incoming, merged = module.__dict__.pop("_incoming", (frozenset(), None))
        for name in incoming & set(module._awaited):
            del module._awaited[name]  # (rebuilt and read below)
        if module.delta_indices.is_meta or module.weight.is_meta:
            return
        for name in module.deltas:
            if name in incoming:
                module.deltas[name].rebuild_layout()
        if not incoming:
            return  # values (and bases saved beside them) only: W and the positions are as they were
        if merged is not None and "base_layer.weight" in incoming and module.quantization is None:
            # the loaded W holds W + S of that adapter (saved merged): its saved base makes it pure (a quantized
            # weight is never merged, and never written)
            delta = module.deltas[merged]
            module._weight.put(delta.indices, delta.base)
        # W is pure here: every adapter's base is read from it again (a new base model re-bases the deltas)
        module._weight.reread_base()
        for name, delta in module.deltas.items():
            if name != module.active_adapter and delta.k:
                delta.base.copy_(module.base_values_at(delta.indices))
        module._strategy.after_load(module)
        module._claim_weight()  # assign=True may have brought a new weight

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._awaited:
            self.settle_positions()
        if validation_from_env():
            self._check_buffers()
        if self.apet_disabled or not self._active_adapter:
            return self._strategy.forward_disabled(self, x)
        if self._active.values.is_meta and not x.is_meta:
            raise ApetStateError(f"adapter {self.active_adapter!r}'s values are on the meta device (injected with "
                                 "low_cpu_mem_usage=True): load its state dict first (set_peft_model_state_dict(..., "
                                 "low_cpu_mem_usage=True), PeftModel.load_adapter)")
        if self._mixed is not None:
            return self._forward_mixed(x)
        return self._strategy.forward(self, x)

    @torch.no_grad()
    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with one adapter per batch row (unmerged): the base output, plus for each adapter
        its sparse term on the tokens of its rows only."""
        if not self._strategy.applies_several:
            raise ApetStateError("a mixed-adapter batch runs unmerged; this layer is merged")
        y = self.base_layer(x).clone()
        xs = x.to(y.dtype).reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)
        spmm = implementation(self._backend_name()).spmm_
        for name, tokens in self._mixed.token_groups(tuple(x.shape), x.device):
            delta = self.deltas[name] if name in self.deltas else None
            if delta is None or delta.k == 0:
                continue
            part = torch.zeros(tokens.numel(), self.out_features, dtype=y.dtype, device=y.device)
            spmm(part, xs.index_select(0, tokens), delta.indices, delta.values, delta.row_ptr)
            y2.index_add_(0, tokens, part)
        return y

    def begin_mixed_batch(self, plan) -> None:
        """Run the next forwards as a mixed-adapter batch (``plan``: an ApetModel MixedBatch)."""
        self._unmerge_for_several("the adapters of a mixed-adapter batch")
        self._mixed = plan

    def end_mixed_batch(self) -> None:
        self._mixed = None
        self._merge_again()

    def _check_buffers(self) -> None:
        """APET_VALIDATE=1: indices in range, sorted, unique and consistent with the row offsets."""
        numel = self.out_features * self.in_features
        for name, delta in self.deltas.items():
            check_index_meta(delta.indices, numel)
            check_index_content(delta.indices, numel)
            rows = build_layout(delta.indices, (self.out_features, self.in_features), columns=False).row_ptr
            if not torch.equal(rows.cpu(), delta.row_ptr.cpu()):
                raise ApetValueError(f"adapter {name!r}: indices changed in place since the layer was built or loaded; "
                                 f"change positions through load_state_dict or set_positions")

    def extra_repr(self) -> str:
        k, numel = self.delta_indices.numel(), self.out_features * self.in_features
        adapters = "" if list(self.deltas) == [DEFAULT_ADAPTER] else f", active_adapters={self.active_adapters}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, k={k} ({100.0 * k / max(numel, 1):.3g}%), "
                f"strategy={self.strategy}, backend={self.backend}{adapters}"
                + (f", quantized={self.quantization}" if self.quantization is not None else ""))


def _check_float_entry(t, key: str, k: int, finite: bool) -> None:
    if t is None:
        return
    if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != (k,):
        raise ApetValueError(f"{key} must be a float tensor of shape ({k},), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if finite and not t.is_meta:
        check_finite(t, key)


def _check_not_wrapped(weight: torch.Tensor) -> None:
    if _owner_of(weight) is not None:
        raise ApetValueError("this weight is already wrapped by another SparseDeltaLinear: two wrappers would write two "
                         "deltas into one weight and could not restore it (unload the first one, or wrap a copy)")


class DenseMaskLinear(nn.Module):
    """Dense-mask APET (the baseline): a full-size fp32 delta and a full-size bool mask.

    forward: y = x (W + M * Delta)^T + b, with W + M * Delta rounded to W's dtype (what
    dense-mask APET in bf16 does). Costs about 17 bytes per weight element under Adam,
    whatever K is: this is what SparseDeltaLinear avoids.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, indices: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        check_index_meta(indices, weight.numel())
        check_index_content(indices, weight.numel())
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        mask.view(-1)[indices.long().to(weight.device)] = True
        self.register_buffer("mask", mask)
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor) -> "DenseMaskLinear":
        return cls(linear.weight, linear.bias, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_eff = (self.weight.float() + self.delta * self.mask).to(self.weight.dtype)
        return F.linear(x, w_eff, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, k={int(self.mask.sum())}"
