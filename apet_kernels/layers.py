"""Drop-in modules: SparseDeltaLinear (sparse APET) and DenseMaskLinear (the dense-mask baseline)."""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import check_finite, check_index_content, check_index_meta, validation_from_env
from .ops.dispatch import CHOICES, implementation, resolve
from .ops.layout import DeltaLayout, build_layout
from .ops.library import add_sparse_term
from .quantized import dims as quantized_dims
from .quantized import float_dtype, quantization_of, values_at
from .selection import select_indices

STRATEGIES = ("auto", "merged", "unmerged")

# weight Parameter -> (weak) the SparseDeltaLinear wrapping it. Two wrappers over one weight would
# both write it in the merged strategy and neither could restore it.
_WRAPPERS = WeakIdKeyDictionary()


def _budget(numel: int, k: int | None, density: float | None) -> int:
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k or density")
    if k is None:
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density}")
        k = round(density * numel)
    return k


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module; GPT-2's Conv1D stores its weight as (in, out);
    a quantized weight may be packed (bitsandbytes 4-bit: (n, 1) bytes)."""
    if quantization_of(module) is not None:
        return quantized_dims(module)
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def _is_plain(module: nn.Module) -> bool:
    return type(module) is nn.Linear or is_conv1d(module)


def merge_is_legal(base_layer: nn.Module, shared: bool = False) -> tuple[bool, str]:
    """Merged writes W's storage and relies on the layer computing x W^T + b from it: only plain
    nn.Linear / Conv1D layers with a floating, unquantized, unsharded weight that no other module uses."""
    quant = quantization_of(base_layer)
    if quant is not None:
        return False, (f"the weight is quantized ({quant}): merging would write its quantized storage, so the "
                       f"deltas run unmerged (merge_and_unload() dequantizes the layer and adds them)")
    if not _is_plain(base_layer):
        return False, (f"the base layer is a {type(base_layer).__name__}, not a plain nn.Linear or Conv1D "
                       f"(its forward may not be x W^T + b on .weight)")
    weight = base_layer.weight
    if not weight.is_floating_point():
        return False, f"weight dtype {weight.dtype} is not floating point (quantized?)"
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        return False, "weight is sharded (DTensor)"
    if shared:
        return False, "weight is shared with another module (tied)"
    return True, ""


class _LinearOverBaseWeight(torch.autograd.Function):
    """x W0^T + b for a merged layer, exactly and without an out x in copy: W0's K entries are
    written into W around each GEMM (forward and dx) and W + S is written back right after."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        with layer._base_weight() as w:
            return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        if ctx.needs_input_grad[0]:
            with ctx.layer._base_weight() as w:
                dx = dy @ w
        if ctx.needs_input_grad[1]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, db, None


# state-dict keys of a base layer's parameters before they moved under `base_layer.` (0.1)
_LEGACY_KEYS = ("weight", "bias")


class SparseDeltaLinear(nn.Module):
    """A linear layer with K tunable scalars at arbitrary positions of its frozen weight.

    ``base_layer`` is the wrapped layer itself (``nn.Linear``, GPT-2 ``Conv1D``, or any module
    computing ``x W^T + b`` with a ``.weight`` of shape (out, in)), frozen; ``weight`` and ``bias``
    are its parameters. ``delta_values`` (fp32, zeros at start) is the only trainable tensor;
    ``delta_indices`` (sorted flat row-major positions, read-only: change them through
    ``load_state_dict``) and ``delta_base`` (W's original values there) are persistent buffers.

    The dense part of the forward is always the base layer's own call; the sparse part is one op.
    Strategies (DESIGN.md): ``merged`` (plain float nn.Linear / Conv1D only) keeps W + S in W's
    storage, so the forward is exactly the base layer's and only the SDDMM in the backward is extra.
    At every enabled forward W is made to hold cast(base + v) for the values the layer holds now,
    whatever changed them (fused optimizers, ``.data`` edits, deep copies, ``functional_call``,
    assigned parameters); writes never bump W's version counter, so graphs saved before them stay
    valid. ``unmerged`` never writes W: ``y = base_layer(x) + x S^T``. ``auto`` merges where legal.
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, *, strategy: str = "auto",
                 backend: str = "auto", weight_shared: bool = False):
        super().__init__()
        if isinstance(base_layer, SparseDeltaLinear):
            raise TypeError("this module is already a SparseDeltaLinear: wrapping it again would merge a second "
                            "delta into the same weight (unmerge or unload the first one)")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        if backend not in CHOICES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")
        weight = getattr(base_layer, "weight", None)
        quantized = quantization_of(base_layer) is not None
        if not isinstance(weight, torch.Tensor) or (weight.dim() != 2 and not quantized):
            raise TypeError(f"{type(base_layer).__name__} has no 2-D .weight: not a linear layer")
        transposed = is_conv1d(base_layer)
        self.out_features, self.in_features = linear_shape(base_layer)
        numel = self.out_features * self.in_features
        check_index_meta(indices, numel)
        check_index_content(indices, numel)
        legal, why = merge_is_legal(base_layer, weight_shared)
        if strategy == "merged" and not legal:
            raise ValueError(f"strategy 'merged' is not legal here: {why}")
        _check_not_wrapped(weight)
        # nothing above changed anything: from here on the construction cannot fail
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.weight_transposed = transposed  # GPT-2's Conv1D: we work on the (out, in) view, never a copy
        self.weight_shared = weight_shared  # a module flag: survives deepcopy and pickling
        self.backend = backend
        self.strategy = "merged" if strategy == "auto" and legal else ("unmerged" if strategy == "auto" else strategy)
        self.apet_disabled = False  # True: behave as the wrapped layer (see ApetModel.disable_apet)
        self.mixed_batch = None  # [(rows, indices, values, row_ptr)]: per-row adapters (ApetModel.mixed_batch)
        self.extra_adapters = None  # [(indices, values, layout)]: other adapters applied too, untrained (unmerged)
        # on the meta device the buffers hold no data; keep the positions until they do (_materialize)
        self._host_indices = indices.detach().to("cpu").clone() if weight.is_meta else None
        self.register_buffer("delta_indices", indices.detach().to(weight.device).clone())
        # a quantized base: W's values are its dequantized ones, in the dtype it was quantized from
        base_dtype = float_dtype(base_layer) if quantized else weight.dtype
        self.register_buffer("delta_base", torch.empty(indices.numel(), dtype=base_dtype, device=weight.device))
        self.delta_values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=weight.device))
        self._base_stale = True  # delta_base is read from the pure W before W is first written
        self._read_base()
        self._rebuild_layout()
        _WRAPPERS[weight] = weakref.ref(self)
        self._register_load_state_dict_pre_hook(self._before_load)
        self.register_load_state_dict_post_hook(SparseDeltaLinear._after_load)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Module, k: int | None = None, density: float | None = None,
                    method: str = "random", seed: int = 0, key: str | None = None,
                    strategy: str = "auto", backend: str = "auto",
                    indices: torch.Tensor | None = None, weight_shared: bool = False) -> "SparseDeltaLinear":
        """Wrap ``linear`` (``nn.Linear``, GPT-2 ``Conv1D`` or another linear-like layer).

        Positions come from ``select_indices(..., method, seed, key)`` with ``k`` or
        ``density``, or are given directly as ``indices``. ``weight_shared=True`` marks a weight
        that other modules use too (tied embeddings): such a layer never merges.
        """
        if isinstance(linear, SparseDeltaLinear):
            raise TypeError("this module is already a SparseDeltaLinear: wrapping it again would merge a second "
                            "delta into the same weight (unmerge or unload the first one)")
        shape = linear_shape(linear)
        if indices is None:
            k = _budget(shape[0] * shape[1], k, density)
            indices = select_indices(shape, k, method=method, seed=seed, key=key or "")
        elif k is not None or density is not None:
            raise ValueError("give either indices or a budget (k / density), not both")
        return cls(linear, indices, strategy=strategy, backend=backend, weight_shared=weight_shared)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setstate__(self, state):
        # deepcopy and unpickling give this module new parameters: it wraps its own new weight
        super().__setstate__(state)
        _WRAPPERS[self.weight] = weakref.ref(self)

    def release_weight(self) -> None:
        """Forget that this layer wraps its weight (after unloading), so it can be wrapped again."""
        ref = _WRAPPERS.get(self.weight)
        if ref is not None and ref() is self:
            del _WRAPPERS[self.weight]

    def _weight_oi(self) -> torch.Tensor:
        return self.weight.t() if self.weight_transposed else self.weight

    def _rebuild_layout(self) -> None:
        """Orderings the kernels walk, derived from the indices (non-persistent buffers, built here and
        never in a forward). The column order (4 bytes per delta) only serves the unmerged backward."""
        layout = build_layout(self.delta_indices, (self.out_features, self.in_features),
                              columns=self.strategy != "merged")
        for name, t in zip(("_row_ptr", "_col_ptr", "_col_perm"), layout):
            self.register_buffer(name, t, persistent=False)

    @property
    def layout(self) -> DeltaLayout:
        return DeltaLayout(self._row_ptr, self._col_ptr, self._col_perm)

    # ----------------------------------------------------------------- W's storage at the K positions
    # The only places that read or write W at the tuned positions. They go through W.data, so the
    # parameter's version counter (what autograd checks for saved tensors) never moves.
    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.delta_indices.long()
        return idx // self.in_features, idx % self.in_features

    def _storage(self) -> torch.Tensor:
        w = self.weight.data
        return w.t() if self.weight_transposed else w

    @torch.no_grad()
    def _read_base(self) -> None:
        """delta_base = W at the positions; W must hold the pure weight there."""
        self._written = None
        if self.weight.is_meta or self.delta_indices.is_meta:
            return  # nothing to read yet: _materialize or a load reads it (the base stays stale)
        if self.quantization is not None:
            base = values_at(self.base_layer, self.delta_indices)  # one dequantized copy of this layer, freed
        else:
            base = self._storage()[self._positions()]
        if self.delta_base.shape == base.shape and self.delta_base.dtype == base.dtype \
                and self.delta_base.device == base.device:
            self.delta_base.copy_(base)
        else:
            self.delta_base = base
        self._base_stale = False

    def current_base(self) -> torch.Tensor:
        """W's own values at the tuned positions (``delta_base``, read from W first if still unread)."""
        if self._base_stale:
            self._read_base()
        return self.delta_base

    @torch.no_grad()
    def _write_base(self) -> None:
        """W[p] = base itself (not base + 0, which turns -0.0 into +0.0): bit-exact restore."""
        self._written = None  # W no longer holds the last merged write
        if not self._base_stale:
            self._storage().index_put_(self._positions(), self.delta_base)

    def _write_merged(self, values: torch.Tensor, backend_name: str | None = None) -> None:
        """W[p] = cast(base + v): K writes, through the backend's own scatter (no autograd: W.data
        and detached values; at every merged forward, so kept to a few microseconds of host time)."""
        if self._base_stale:
            self._read_base()
        implementation(backend_name or self._backend_name()).scatter_merge_(
            self._storage(), self.delta_indices, self.delta_base, values.detach())

    @contextlib.contextmanager
    def _base_weight(self):
        """W holds the pure weight inside the block and W + S again after it (merged layers)."""
        self._write_base()
        try:
            yield self._weight_oi()
        finally:
            self._write_merged(self.delta_values)

    # ----------------------------------------------------------------- merge state
    @property
    def quantization(self):
        """The base weight's quantization (apet_kernels.quantized.Quantization), or None."""
        return quantization_of(self.base_layer)

    @property
    def merged(self) -> bool:
        """True while the merged strategy runs: every enabled forward writes W + S into W's storage."""
        return self.strategy == "merged"

    def merge_legality(self) -> tuple[bool, str]:
        return merge_is_legal(self.base_layer, self.weight_shared)

    def _backend_name(self) -> str:
        return resolve(self.backend, self.weight.device)

    def merge(self) -> None:
        """Switch to the merged strategy and write W + S into W's storage now."""
        legal, why = self.merge_legality()
        if not legal:
            raise RuntimeError(f"cannot merge: {why}")
        if self.__dict__.get("extra_adapters"):
            raise RuntimeError("cannot merge: other adapters are applied together with this one (unmerged); "
                               "set_adapter() a single adapter first")
        self._write_merged(self.delta_values)
        self.strategy = "merged"

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W bit-exactly from ``delta_base`` and switch to the unmerged strategy."""
        if self.strategy == "merged":
            self._write_base()
            self.strategy = "unmerged"
            self._rebuild_layout()  # the unmerged backward walks the deltas by column too

    @torch.no_grad()
    def set_positions(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Tune K other positions (K unchanged): W is restored at the old positions, the base read at
        the new ones, and ``values`` (default: zeros) written in place into ``delta_values`` so an
        optimizer keeps its reference. Used by drop-and-regrow (apet_kernels.positions.Regrower)."""
        k, numel = self.delta_indices.numel(), self.out_features * self.in_features
        check_index_meta(indices, numel)
        if indices.numel() != k:
            raise ValueError(f"set_positions keeps K fixed: got {indices.numel()} positions, the layer has {k}")
        check_index_content(indices, numel)
        if values is not None and tuple(values.shape) != (k,):
            raise ValueError(f"values must have shape ({k},), got {tuple(values.shape)}")
        if self.strategy == "merged":
            self._write_base()
        self.delta_indices.copy_(indices.to(self.delta_indices.device, self.delta_indices.dtype))
        self._base_stale = True
        self._read_base()
        self._rebuild_layout()
        if values is None:
            self.delta_values.zero_()
        else:
            self.delta_values.copy_(values)

    @torch.no_grad()
    def swap_adapter(self, indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make this layer apply another adapter's deltas (any K) and return the current ones (indices,
        values), detached. Touches only the positions involved: W is restored at the old K positions and
        (merged) ``cast(base + v)`` written at the new K right away. ``delta_values`` stays the same
        Parameter when K is unchanged, else it is replaced (an optimizer must be rebuilt then).
        Checked before anything changes."""
        numel = self.out_features * self.in_features
        check_index_meta(indices, numel)
        check_index_content(indices, numel)
        if tuple(values.shape) != (indices.numel(),) or not values.is_floating_point():
            raise ValueError(f"values must be a float tensor of shape ({indices.numel()},), got "
                             f"{values.dtype} {tuple(values.shape)}")
        check_finite(values, "adapter values")
        old = (self.delta_indices.clone(), self.delta_values.detach().clone())
        if self.strategy == "merged":
            self._write_base()
        device = self.delta_indices.device
        self.delta_indices = indices.to(device).clone()
        if values.numel() == self.delta_values.numel():
            self.delta_values.copy_(values)
        else:
            self.delta_values = nn.Parameter(values.detach().to(device, torch.float32).clone(),
                                             requires_grad=self.delta_values.requires_grad)
        self._base_stale = True
        self._read_base()
        self._rebuild_layout()
        if self.strategy == "merged":
            self._write_merged(self.delta_values)
        return old

    @torch.no_grad()
    def base_values_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The base weight's values at any positions (dequantized if quantized), without unmerging: where a
        merged W holds W + S, the saved base is used."""
        if self.quantization is not None:
            return values_at(self.base_layer, indices)
        idx = indices.long().to(self.delta_indices.device)
        values = self._storage()[idx // self.in_features, idx % self.in_features].clone()
        if self.strategy == "merged" and self.delta_indices.numel():
            mine = self.delta_indices.long()
            overlap = torch.isin(idx, mine)
            if overlap.any():
                values[overlap] = self.current_base()[torch.searchsorted(mine, idx[overlap])]
        return values

    def delta_weight(self) -> torch.Tensor:
        """Dense fp32 Delta W (out, in). For inspection and merging only: allocates out x in."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32,
                            device=self.delta_values.device)
        dense.view(-1)[self.delta_indices.long()] = self.delta_values.detach().float()
        return dense

    # ----------------------------------------------------------------- device moves and meta init
    def _apply(self, fn, recurse=True):
        was_meta = self.delta_indices.is_meta
        result = super()._apply(fn, recurse)
        self._written = None  # dtype or storage may have changed: write again
        if was_meta and not self.delta_indices.is_meta:
            self._materialize()  # to_empty(): the buffers now hold garbage
        return result

    @torch.no_grad()
    def _materialize(self) -> None:
        """After meta-device construction: the positions kept on the host, zero values, and the base
        read from W once W holds data (at the next forward or load, whichever comes first)."""
        if self.weight.is_meta or self._host_indices is None:
            return
        device = self.weight.device
        self.delta_indices = self._host_indices.to(device)
        if self.delta_values.is_meta or self.delta_values.device != device:
            self.delta_values = nn.Parameter(torch.zeros(self.delta_indices.numel(), device=device))
        else:
            self.delta_values.zero_()
        self._host_indices = None
        self._base_stale = True
        self._rebuild_layout()
        _WRAPPERS[self.weight] = weakref.ref(self)  # a new Parameter object when it left the meta device

    # ----------------------------------------------------------------- state dict
    @staticmethod
    def upgrade_state_dict(state_dict, prefix: str) -> None:
        """Move 0.1's flat ``weight``/``bias`` keys (and those of an unpatched checkpoint) under
        ``base_layer.``, in place, so plain checkpoints load into patched models."""
        for name in _LEGACY_KEYS:
            old, new = prefix + name, prefix + "base_layer." + name
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)

    def check_state_dict(self, state_dict, prefix: str = "") -> None:
        """Everything load_state_dict would put in this layer, checked before anything is copied."""
        numel, k = self.out_features * self.in_features, self.delta_indices.numel()
        for name in ("weight", "bias"):
            mine = getattr(self.base_layer, name, None)
            t = state_dict.get(f"{prefix}base_layer.{name}")
            if t is not None and mine is not None and torch.is_tensor(t) and t.shape != mine.shape:
                raise ValueError(f"{prefix}base_layer.{name} has shape {tuple(t.shape)}, this layer's is "
                                 f"{tuple(mine.shape)}")
        idx = state_dict.get(prefix + "delta_indices")
        if idx is not None:
            try:
                check_index_meta(idx, numel)
                if idx.numel() != k:
                    raise ValueError(f"it has {idx.numel()} entries, this layer has {k}")
                if not idx.is_meta:
                    check_index_content(idx, numel)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{prefix}delta_indices: {exc}") from None
        for name in ("delta_values", "delta_base"):
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != (k,):
                raise ValueError(f"{prefix}{name} must be a float tensor of shape ({k},), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if name == "delta_values" and not t.is_meta:
                check_finite(t, prefix + name)

    def _before_load(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_state_dict(state_dict, prefix)
        self.check_state_dict(state_dict, prefix)
        self._incoming = frozenset(n for n in ("base_layer.weight", "delta_indices", "delta_base")
                                   if prefix + n in state_dict)
        # the positions may move and the weight may be replaced: start from the pure W
        if self.strategy == "merged":
            self._write_base()

    @staticmethod
    @torch.no_grad()
    def _after_load(module: "SparseDeltaLinear", incompatible_keys) -> None:
        incoming = module.__dict__.pop("_incoming", frozenset())
        module._materialize()
        if module.delta_indices.is_meta or module.weight.is_meta:
            return
        if "delta_indices" in incoming:
            module._rebuild_layout()
        if "base_layer.weight" in incoming and "delta_base" in incoming:
            module._base_stale = False
            module._write_base()  # a saved merged W holds W + S at the saved positions
        loaded_base = module.delta_base.clone() if "delta_base" in incoming and "base_layer.weight" not in incoming \
            else None
        # W is pure here in every case: its values at the positions are the base
        module._read_base()
        if loaded_base is not None and not module._base_stale and not torch.equal(loaded_base, module.delta_base):
            warnings.warn("the loaded delta_base differs from this layer's weight at the tuned positions (a state "
                          "dict from another base model?); keeping the weight's values as the base")
        _WRAPPERS[module.weight] = weakref.ref(module)  # assign=True may have brought a new weight

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if validation_from_env():
            self._check_buffers()
        merged = self.strategy == "merged"
        if self.apet_disabled:
            return self._forward_base(x) if merged else self.base_layer(x)
        if self.__dict__.get("mixed_batch") is not None:
            return self._forward_mixed(x)
        backend_name, values = self._backend_name(), self.delta_values
        if merged:
            self._sync(values, backend_name)
            if not (values.requires_grad and torch.is_grad_enabled()):
                return self.base_layer(x)  # no SDDMM to prepare for
        y = self.base_layer(x)
        if not merged and not _is_plain(self.base_layer) and y._is_view():  # (plain first: compiles)
            # the sparse term is added in place; a library's custom Function may return a view of its own
            # output, which autograd forbids writing in place (bitsandbytes int8): add to a copy instead
            y = y.clone()
        y = add_sparse_term(y, x, values, self.delta_indices, self.layout, merged, backend_name)
        for indices, extra_values, layout in self.__dict__.get("extra_adapters") or ():
            y = add_sparse_term(y, x, extra_values, indices, layout, False, backend_name)  # values: no grad
        return y

    @torch.no_grad()
    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with one adapter per batch row (unmerged): the base output, plus for each adapter
        its sparse term on its rows only (rows of no group get the base output)."""
        if self.strategy == "merged":
            raise RuntimeError("a mixed-adapter batch runs unmerged; this layer is merged")
        y = self.base_layer(x).clone()
        spmm = implementation(self._backend_name()).spmm_
        for rows, indices, values, row_ptr in self.mixed_batch:
            if rows.numel() and rows.max() >= x.shape[0]:
                raise ValueError(f"adapter_names has more rows than the batch ({x.shape[0]})")
            part = torch.zeros((rows.numel(),) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
            spmm(part.reshape(-1, part.shape[-1]), x[rows].reshape(-1, x.shape[-1]), indices, values, row_ptr)
            y[rows] += part
        return y

    def _sync(self, values: torch.Tensor, backend_name: str) -> None:
        """Make W hold cast(base + v) for ``values``. On a GPU, or while compiling: always write (one
        launch, async; inside a graph the write is the registered op). Eagerly on the CPU with the
        native extension: skip the K random writes if the values' content hash and W's storage and
        version are those of the last write (the content, not a version counter: fused optimizers,
        .data edits and copies all change the content). The stamp is taken before the write, so a
        change racing with it is caught at the next forward."""
        if torch.compiler.is_compiling():
            if self._base_stale:
                self._read_base()
            torch.ops.apet.scatter_merge_(self._storage(), self.delta_indices, self.delta_base, values.detach(),
                                          backend_name)
            return
        stamp = None
        if values.device.type == "cpu" and backend_name == "native" and values.is_contiguous():
            from .ops.native import fingerprint
            w = self.weight
            stamp = (fingerprint(values.detach()), w.data_ptr(), w._version)
            if stamp == self._written:
                return
        self._write_merged(values, backend_name)
        self._written = stamp

    @torch.compiler.disable
    def _forward_base(self, x: torch.Tensor) -> torch.Tensor:
        if self._base_stale:
            self._read_base()
        return _LinearOverBaseWeight.apply(x, self.bias, self)

    def _check_buffers(self) -> None:
        """APET_VALIDATE=1: indices in range, sorted, unique and consistent with the row offsets."""
        numel = self.out_features * self.in_features
        check_index_meta(self.delta_indices, numel)
        check_index_content(self.delta_indices, numel)
        rows = build_layout(self.delta_indices, (self.out_features, self.in_features), columns=False).row_ptr
        if not torch.equal(rows.cpu(), self._row_ptr.cpu()):
            raise ValueError("delta_indices changed in place since the layer was built or loaded; change positions "
                             "through load_state_dict")

    def extra_repr(self) -> str:
        k, numel = self.delta_indices.numel(), self.out_features * self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, k={k} ({100.0 * k / max(numel, 1):.3g}%), "
                f"strategy={self.strategy}, backend={self.backend}"
                + (f", quantized={self.quantization}" if self.quantization is not None else ""))


def _check_not_wrapped(weight: torch.Tensor) -> None:
    ref = _WRAPPERS.get(weight)
    owner = ref() if ref is not None else None
    if owner is not None and owner.weight is weight:
        raise ValueError("this weight is already wrapped by another SparseDeltaLinear: two wrappers would write two "
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
