"""How a SparseDeltaLinear runs its active adapter: one object per strategy, each owning its forward, what it does
around a change of the active positions (an adapter switch, moved positions, a load), whether a state dict's
weight holds W + S, and whether it can apply several adapters at once.

- ``Merged`` (plain float nn.Linear / GPT-2 Conv1D whose weight is its own): W + S lives in W's storage
  (apet_kernels.merged_weight), so the forward and dx are the base layer's own GEMMs and only the SDDMM is extra.
- ``Unmerged``: W is never written; ``y = base_layer(x) + x S^T`` (a plain float layer as one autograd node).
- ``Dequantized`` (a quantized base): S is scattered into the weight each GEMM dequantizes; the quantized
  storage is never written.

The layer holds one of them (``layer.strategy`` is its name) and switches with ``merge()`` / ``unmerge()``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .dequantized_linear import DequantizedLinear
from .errors import ApetStateError
from .linear_like import is_plain_linear, runs_as_plain_gemm
from .merged_weight import LinearOverBaseWeight, MergedWeight
from .ops.library import add_sparse_term, linear_sparse
from .quantized import repacked_for_cpu
from .sharded import is_dtensor
from .tensor_parallel import owned_deltas, tensor_parallel_block
from .zero3 import gathered, is_gathered, is_partitioned


class Strategy:
    name = ""
    columns = True  # the active adapter's deltas are also walked by column (an unmerged backward's dx += dy S)
    holds_sum = False  # between calls W's storage holds cast(W + S) of the active adapter
    applies_several = True  # several active adapters (their terms added) and mixed-adapter batches

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_disabled(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.base_layer(x)

    @contextlib.contextmanager
    def changing(self, layer):
        """Around a change of the active adapter's positions or of the adapter itself: W is pure inside."""
        yield

    def before_state_dict(self, layer) -> None:
        """A state dict is about to be taken: the weight in it must be the base weight."""

    def before_load(self, layer) -> None:
        """A load may move the positions or replace the weight: make W pure first."""

    def after_load(self, layer) -> None:
        """The positions or the weight changed under a load (W pure, base read again)."""

    def after_move(self, layer) -> None:
        """The weight's dtype, device or storage may have changed (``module.to``, ``to_empty``)."""

    def __repr__(self) -> str:
        return self.name

    # one object per strategy, kept by copies and pickles (layers compare them by identity)
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _by_name, (self.name,)


def _with_sparse_terms(layer, x, y, values, backend: str, merged: bool) -> torch.Tensor:
    """y (the base output) + the active adapter's sparse term (merged: only its SDDMM backward) + the terms of the
    adapters applied with it."""
    active = layer._active
    if not merged and not is_plain_linear(layer.base_layer) and y._is_view():  # (plain first: compiles)
        # the sparse term is added in place; a library's custom Function may return a view of its own
        # output, which autograd forbids writing in place (bitsandbytes int8): add to a copy instead
        y = y.clone()
    if x.dtype != y.dtype:  # autocast, or a base computing in another dtype: x as the GEMM took it
        x = x.to(y.dtype)
    y = add_sparse_term(y, x, values, active.indices, active.layout, merged, backend)
    for name in layer.active_adapters[1:]:
        extra = layer.deltas[name]
        if extra.k:
            y = add_sparse_term(y, x, extra.values, extra.indices, extra.layout, False, backend)
    return y


class Unmerged(Strategy):
    name = "unmerged"

    def forward(self, layer, x):
        backend, active = layer._backend_name(), layer._active
        if len(layer.active_adapters) == 1 and not torch.compiler.is_compiling() and \
                runs_as_plain_gemm(layer.base_layer, x):
            # one node for the GEMM and the sparse term: dx = dy W and dx += dy S in one buffer
            return linear_sparse(x, layer.weight_oi(), layer.base_layer.bias, active.values, active.indices,
                                 active.layout, backend)
        return _with_sparse_terms(layer, x, layer.base_layer(x), active.values, backend, merged=False)


class Dequantized(Strategy):
    name = "dequantized"
    columns = False

    def forward(self, layer, x):
        backend, active = layer._backend_name(), layer._active
        if repacked_for_cpu(layer.base_layer):  # a base that cannot dequantize per call runs this forward unmerged
            if active.col_perm is None:
                active.rebuild_layout(columns=True)
            return _with_sparse_terms(layer, x, layer.base_layer(x), active.values, backend, merged=False)
        y = DequantizedLinear.apply(x, layer.base_layer.bias, active.values, active.indices, layer.base_layer)
        return _with_sparse_terms(layer, x, y, active.values, backend, merged=True)  # (the SDDMM only)


class Merged(Strategy):
    name = "merged"
    columns = False
    holds_sum = True
    applies_several = False

    def forward(self, layer, x):
        backend, values, merge = layer._backend_name(), layer._active.values, MergedWeight.of(layer)
        if is_dtensor(layer.base_layer._parameters.get("weight")):
            block = tensor_parallel_block(layer.base_layer)
            if block is not None:
                return _forward_tensor_parallel(layer, x, block, values, backend)
        if is_partitioned(layer.base_layer._parameters.get("weight")):
            y = _run_on_zero3_gathered_weight(layer, x, lambda: merge.write(values, backend))
            if not (values.requires_grad and torch.is_grad_enabled()):
                return y
            return _with_sparse_terms(layer, x, y, values, backend, merged=True)
        w, own = layer.base_layer._parameters.get("weight"), layer.__dict__.get("_own_weight")
        regathered = _check_mergeable_now(w, own) is not own
        if regathered:  # gathered from shards that never hold S (a recompute's gather too): always written
            merge.write(values, backend)
        else:
            merge.sync(values, backend)
        if not (values.requires_grad and torch.is_grad_enabled()):
            return layer.base_layer(x)  # no SDDMM to prepare for
        y = layer.base_layer(x)
        if regathered and y.requires_grad:  # (no input gradient wanted: the backward never reads W)
            # FSDP2 gathers W from its shards for this forward and again for the backward (reshard_after_forward):
            # the backward's W is written again just before the base layer's dx reads it (the shards stay pure)
            y.register_hook(functools.partial(_write_before_dx, layer, values, backend))
        return _with_sparse_terms(layer, x, y, values, backend, merged=True)

    @torch.compiler.disable
    def forward_disabled(self, layer, x):
        layer._weight.base()
        if is_partitioned(layer.base_layer._parameters.get("weight")):  # (a persistent one may hold W + S)
            return _run_on_zero3_gathered_weight(layer, x, MergedWeight.of(layer).restore)
        return LinearOverBaseWeight.apply(x, layer.bias, layer)

    def enter(self, layer) -> None:
        """The layer becomes merged: W + S written into W now."""
        state = MergedWeight.of(layer)
        state.structural_change()
        state.write(layer.delta_values, layer._backend_name())

    def leave(self, layer) -> None:
        """The layer leaves the merged strategy: W restored bit-exactly."""
        state = MergedWeight.of(layer)
        state.restore()
        state.structural_change()

    def bake(self, layer) -> None:
        """W + S into W for good, whatever strategy the layer runs (merge_and_unload); under ZeRO-3 into its
        partitions (a collective: every rank unloads)."""
        w = layer.base_layer._parameters.get("weight")
        with gathered([w] if is_partitioned(w) and not is_gathered(w) else [], write=True):
            MergedWeight.of(layer).write(layer.delta_values, layer._backend_name())

    @contextlib.contextmanager
    def changing(self, layer):
        self.leave(layer)
        yield
        MergedWeight.of(layer).write(layer.delta_values, layer._backend_name())

    def before_state_dict(self, layer) -> None:
        # a state dict holds the base weight (what peft.get_base_model_state_dict and a load back expect; a W + S
        # there would count the adapter twice): W is restored at the K positions, and the next forward writes
        # W + S again. Checkpoints of 0.3 that hold W + S carry a merged flag, and still load.
        flattened = getattr(layer.__dict__.get("_own_weight"), "_fsdp_flattened", False)  # (FSDP1: never ran merged)
        if not layer._weight.stale and not layer.weight.is_meta and not flattened:
            MergedWeight.of(layer).restore()

    def before_load(self, layer) -> None:
        MergedWeight.of(layer).restore()

    def after_load(self, layer) -> None:
        MergedWeight.of(layer).structural_change()

    def after_move(self, layer) -> None:
        MergedWeight.of(layer).written = None  # (the stamp names a storage that may be gone)


_FSDP1 = ("FSDP1 (FullyShardedDataParallel) flattened this merged layer's weight into its flat parameter, whose shards "
          "W + S cannot be kept in: the merged strategy is not supported there; build the adapter with "
          "strategy='unmerged', or shard with FSDP2 (torch.distributed.fsdp.fully_shard)")


def _check_mergeable_now(w, own):
    """The base layer's weight Parameter at a merged forward (``own``: the one the layer wrapped), refused where
    W + S could not last in it."""
    if not isinstance(w, torch.nn.Parameter) and getattr(own, "_fsdp_flattened", False):
        raise ApetStateError(_FSDP1)  # (FSDP1 hands the layer plain views of its flat parameter)
    if w is not None and not isinstance(w, torch.nn.Parameter):
        raise ApetStateError("this merged layer's weight was swapped for a plain tensor (torch.func.functional_call, "
                             "torch.func.grad): W + S is written into the layer's own weight, never into a tensor "
                             "passed in. Run such calls with strategy='unmerged' (or unmerge() the layers first), or "
                             "pass nn.Parameter copies")
    if w is None:
        raise ApetStateError("this merged layer's base weight is no longer a Parameter of its layer (pruned or "
                             "parametrized after patching, or flattened by FSDP1), so W + S cannot be written into "
                             "it: unmerge() the layer first (prune or parametrize before patching: such layers run "
                             "unmerged)")
    if getattr(w, "_fsdp_flattened", False):
        raise ApetStateError(_FSDP1)
    return w


def _forward_tensor_parallel(layer, x: torch.Tensor, block, values: torch.Tensor, backend: str) -> torch.Tensor:
    """A merged layer under tensor parallelism: this rank's deltas written into its shard (K writes), the engine's
    forward, and the SDDMM of this rank's deltas over its local dy and x (colwise: its slice of y and the whole x;
    rowwise: the whole y and its slice of x)."""
    MergedWeight.of(layer).write(values, backend)
    y = layer.base_layer(x)
    if not (values.requires_grad and torch.is_grad_enabled()):
        return y
    if is_dtensor(y):
        raise ApetStateError("this tensor-parallel layer returns a DTensor (use_local_output=False): APET's SDDMM takes "
                             "the local output; parallelize with use_local_output=True (the default)")
    owned = owned_deltas(layer, block)
    if y.shape[-1] != owned.shape[0] or x.shape[-1] != owned.shape[1]:
        raise ApetStateError(f"this tensor-parallel layer's input and output ({x.shape[-1]}, {y.shape[-1]} features) are "
                             f"not this rank's slices of its block {owned.shape}: APET supports ColwiseParallel with "
                             "its output sharded and RowwiseParallel with its input sharded (transformers' 'colwise' "
                             "and 'rowwise'), not styles that gather the output or split a replicated input")
    mine = values[owned.own]  # (a gather: its gradient lands in the K-sized one, zeros where other ranks own)
    if not owned.own.numel():
        return y + mine.sum()  # (no deltas here: a zero gradient all the same, for the group's sum)
    return add_sparse_term(y, x if x.dtype == y.dtype else x.to(y.dtype), mine, owned.indices, owned.layout, True,
                           backend)


def _run_on_zero3_gathered_weight(layer, x: torch.Tensor, fill) -> torch.Tensor:
    """base_layer(x) where DeepSpeed ZeRO-3 partitions W: it gathers W in a forward pre-hook of the base layer and
    again for its backward, from partitions that are never written. ``fill`` writes W's K positions (W + S, or the
    base) into the gathered W: in a pre-hook appended after ZeRO-3's, and in a gradient hook on the base layer's own
    output, which runs after ZeRO-3's re-gather (its hook wraps that output later) and before the dx GEMM."""
    base = layer.base_layer

    def checked_fill(*_):
        if not is_gathered(base.weight):
            raise ApetStateError("DeepSpeed ZeRO-3 has not gathered this merged layer's weight where its forward or "
                                 "backward reads it (a DeepSpeed version whose hooks run elsewhere?): W + S cannot be "
                                 "written; build the adapter with strategy='unmerged'")
        fill()

    def before_dx(module, args, y):
        if isinstance(y, torch.Tensor) and y.requires_grad:
            y.register_hook(checked_fill)

    handles = (base.register_forward_pre_hook(checked_fill), base.register_forward_hook(before_dx, prepend=True))
    try:
        return base(x)
    finally:
        for handle in handles:
            handle.remove()


def _write_before_dx(layer, values: torch.Tensor, backend: str, grad: torch.Tensor) -> None:
    """(A gradient hook on a merged layer's base output: W as the engine re-gathered it gets W + S again.)"""
    MergedWeight.of(layer).write(values, backend)


MERGED, UNMERGED, DEQUANTIZED = Merged(), Unmerged(), Dequantized()
BY_NAME = {s.name: s for s in (MERGED, UNMERGED, DEQUANTIZED)}


def _by_name(name: str) -> Strategy:
    return BY_NAME[name]
