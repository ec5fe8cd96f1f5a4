"""SparseDeltaLinear: a linear layer with K tunable scalars at arbitrary positions of its frozen weight.

It holds every adapter it applies as module state, PEFT-style: ``deltas`` maps an adapter name to a ``DeltaSet``
(its K positions and the base weight's values there, buffers, and its values, a Parameter), so ``.to()``, state
dicts, DCP checkpoints, DDP/FSDP and deep copies see all of them. One adapter is active (applied and trained); others
may be applied with it, untrained (``active_adapters``), or per batch row (``mixed_batch``). How the sparse term is
applied is the strategy's business (apet_kernels.strategies); the state-dict rules, weight ownership and awaited
positions live beside this module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .._checks import check_finite, validation_from_env
from ..base_weight import BaseWeight
from ..errors import ApetStateError, ApetTypeError, ApetValueError
from ..linear_like import is_conv1d, linear_shape, merge_is_legal, stored_weight
from .. import process_hooks
from ..load_guard import check_strict_keys, needed_by
from ..ops.dispatch import resolve
from ..optimizer_guard import note_active_values
from ..quantized import float_dtype, quantization_of, values_at
from ..selection import select_indices
from ..sharded import average_gradient_over_ranks, is_dtensor
from ..tensor_parallel import sum_gradient_over_group, tensor_parallel_block
from ..strategies import BY_NAME, DEQUANTIZED, MERGED, UNMERGED
from . import auto_merge, awaited
from . import state_dict as state_dict_rules
from .adapter_access import AdapterAccess
from .construction import check_wrappable
from .delta_set import DeltaSet
from .mixed_forward import forward_mixed
from .names import DEFAULT_ADAPTER, budget, check_adapter_name, known_adapters
from .ownership import claim, memory_owner, release


_SEVERAL_ACTIVE = ("cannot merge: other adapters are applied together with this one (unmerged); set_adapter() a "
                   "single adapter first")


class SparseDeltaLinear(AdapterAccess, nn.Module, BaseTunerLayer):
    """A linear layer with K tunable scalars at arbitrary positions of its frozen weight.

    ``base_layer`` is the wrapped layer (``nn.Linear``, GPT-2 ``Conv1D``, or any module computing ``x W^T + b``
    with a ``.weight`` of shape (out, in)), frozen. ``deltas[name]`` holds each adapter's positions and values
    (zeros at the start); ``delta_values`` / ``delta_indices`` are the active adapter's, the only trainable tensor.
    Strategies (apet_kernels.strategies): ``merged`` keeps W + S in W's storage (the forward is the base layer's,
    the SDDMM in the backward the only extra), ``unmerged`` never writes W (``y = base_layer(x) + x S^T``),
    ``auto`` merges where legal. The sparse term takes x in the dtype of the base layer's output.
    """

    _apet_layer = True  # (what apet_kernels.load_guard looks for)
    # PEFT's tuner-layer interface (apet_kernels.tuner): every adapter's tensors live under ``deltas``
    adapter_layer_names = ("deltas",)

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, *, strategy: str = "auto",
                 backend: str = "auto", weight_shared: bool = False, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        weight, quantized, legal = check_wrappable(base_layer, indices, strategy, backend, weight_shared, adapter_name)
        self.out_features, self.in_features = linear_shape(base_layer)
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
        if is_dtensor(weight) and self._active.k:  # patched after sharding: no engine reduces these values
            block = tensor_parallel_block(base_layer)
            if block is not None:  # each rank computes its own deltas' gradient (apet_kernels.tensor_parallel)
                sum_gradient_over_group(self.delta_values, block.group)
            else:
                average_gradient_over_ranks(self.delta_values)
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
            k = budget(shape[0] * shape[1], k, density)
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

    # ----------------------------------------------------------------- the weight and its wrapper
    def __setstate__(self, state):
        # deepcopy and unpickling give this module new parameters: it wraps its own new weight
        state.setdefault("_auto_merged", False)  # (pickled by 0.3.0)
        state.setdefault("_unmerged_for_now", False)
        state.setdefault("merged_adapters", [])
        super().__setstate__(state)
        self._claim_weight()

    def _claim_weight(self) -> None:
        claim(self)
        needed_by(self)  # (the module-registration hook: apet_kernels.process_hooks)

    def release_weight(self) -> None:
        """Forget that this layer wraps its weight (after unloading), so it can be wrapped again; the last layer
        released removes apet_kernels' process-wide hooks."""
        release(self)
        process_hooks.release(self)

    @property
    def quantization(self):
        """The base weight's quantization (apet_kernels.quantized.Quantization), or None."""
        return quantization_of(self.base_layer)

    def merge_legality(self) -> tuple[bool, str]:
        shared = self.weight_shared or memory_owner(self.weight, other_than=self) is not None
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
            raise ApetStateError(_SEVERAL_ACTIVE)
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
            raise ApetStateError(_SEVERAL_ACTIVE)
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
        return auto_merge.switches_itself(self)

    # ----------------------------------------------------------------- adapters
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
            auto_merge.unmerge_for_several(self, "adapters active together")
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
        auto_merge.merge_again(self)
        for name, delta in self.deltas.items():
            delta.values.requires_grad_(name == new and delta.k > 0 and not inference_mode)  # (K = 0: see __init__)
        note_active_values(self, [self.delta_values], [d.values for n, d in self.deltas.items() if n != new])

    # ----------------------------------------------------------------- positions that come with a checkpoint
    def expect_positions(self, adapter: str) -> None:
        """``adapter``'s positions are placeholders until a checkpoint's indices replace them (layer.awaited)."""
        awaited.expect(self, adapter)

    def settle_positions(self) -> None:
        """Take up indices loaded by a loader that bypasses ``load_state_dict``'s hooks (layer.awaited)."""
        awaited.settle(self)

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

    # the rules live in apet_kernels.layer.state_dict; the hooks are named here so that pickles of 0.3 still load
    _before_state_dict = staticmethod(state_dict_rules.before_state_dict)
    _after_load = staticmethod(state_dict_rules.after_load)

    def _before_load(self, *args) -> None:
        state_dict_rules.before_load(self, *args)

    def upgrade_state_dict(self, state_dict, prefix: str) -> None:
        """Move 0.1/0.2's flat keys to where they live now, in place."""
        state_dict_rules.upgrade(self, state_dict, prefix)

    def check_state_dict(self, state_dict, prefix: str = "", assign: bool = False) -> None:
        """Everything load_state_dict would put in this layer, checked before anything is copied (``assign``: the
        incoming tensors become this layer's own)."""
        state_dict_rules.check(self, state_dict, prefix, assign)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._awaited:
            self.settle_positions()
        if validation_from_env():
            state_dict_rules.check_buffers(self)
        if self.apet_disabled or not self._active_adapter:
            return self._strategy.forward_disabled(self, x)
        if self._active.values.is_meta and not x.is_meta:
            raise ApetStateError(f"adapter {self.active_adapter!r}'s values are on the meta device (injected with "
                                 "low_cpu_mem_usage=True): load its state dict first (set_peft_model_state_dict(..., "
                                 "low_cpu_mem_usage=True), PeftModel.load_adapter)")
        if self._mixed is not None:
            return forward_mixed(self, x)
        return self._strategy.forward(self, x)

    def begin_mixed_batch(self, plan) -> None:
        """Run the next forwards as a mixed-adapter batch (``plan``: an ApetModel MixedBatch)."""
        auto_merge.unmerge_for_several(self, "the adapters of a mixed-adapter batch")
        self._mixed = plan

    def end_mixed_batch(self) -> None:
        self._mixed = None
        auto_merge.merge_again(self)

    def extra_repr(self) -> str:
        k, numel = self.delta_indices.numel(), self.out_features * self.in_features
        adapters = "" if list(self.deltas) == [DEFAULT_ADAPTER] else f", active_adapters={self.active_adapters}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, k={k} ({100.0 * k / max(numel, 1):.3g}%), "
                f"strategy={self.strategy}, backend={self.backend}{adapters}"
                + (f", quantized={self.quantization}" if self.quantization is not None else ""))
