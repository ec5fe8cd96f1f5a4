"""The merged strategy's private state (apet_kernels.strategies.Merged): what a layer's frozen weight W holds at its
active adapter's K positions between calls, and the only code that writes W + S there (reads of W, and single-position
writes, go through apet_kernels.base_weight).

The merged strategy keeps ``cast(base + v)`` in W's own storage, so the forward and dx are the base
layer's own GEMMs. ``base`` (the active DeltaSet's ``base`` buffer) is W's original value at each tuned
position. Invariants (tests/test_merged_state.py):

- ``base`` is read from W only while W is pure at those positions;
- after ``write(v)``: W[p] == cast(base + v), bit for bit; after ``restore()``: W[p] == base, bit for bit
  (-0.0 included: base itself is written, never base + 0);
- neither moves W's version counter (writes go through ``.data``), so a graph saved before them stays
  valid (a second forward before a backward, a reference pass); a *structural* change (other positions,
  another adapter, unmerge) does move it, so a backward of a forward taken before the change fails in
  autograd's own check instead of computing dx from another weight;
- ``sync(v)`` skips the write only when v's content hash and W's storage and version equal those of
  the last write (eagerly on the CPU with the native extension; elsewhere it always writes: one launch);
- under FSDP2 the weight a forward sees is gathered from shards that are never written: the layer writes it
  at every forward and again before the backward's dx (SparseDeltaLinear.forward); between steps, reads
  gather the sharded weight (a collective) and writes go to each rank's own block (restore, unmerge).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .ops.dispatch import implementation
from .ops.reference import accumulate_dtype
from .sharded import full_tensor, is_dtensor


class MergedWeight:
    """One merged SparseDeltaLinear's (``layer``) state: the stamp of the last write that ``sync`` may skip against.
    Created by the merged strategy (``of``); the layer's ``_weight`` (apet_kernels.base_weight) holds the base."""

    def __init__(self, layer):
        self.layer = layer
        self.written = None

    @staticmethod
    def of(layer) -> "MergedWeight":
        state = layer.__dict__.get("_merged_weight")
        if state is None:
            state = layer.__dict__["_merged_weight"] = MergedWeight(layer)
        return state

    @property
    def _at(self):
        return self.layer._weight

    def restore(self) -> None:
        """W[p] = base itself: the pure weight, bit-exact."""
        self.written = None
        if not self._at.stale:
            self._at.put(self.layer.delta_indices, self.layer._active.base)

    @torch.no_grad()
    def write(self, values: torch.Tensor, backend: str) -> None:
        """W[p] = cast(base + v): K writes through the backend's own scatter (no autograd); a sharded weight's
        local block gets its own positions."""
        at = self._at
        base = at.base()
        w = at.stored(write=True)
        if not is_dtensor(w) and w.dtype == base.dtype:
            implementation(backend).scatter_merge_(at.storage(write=True), self.layer.delta_indices, base,
                                                   values.detach())
            return
        # a sharded weight, or a gathered one in another dtype than its shards (FSDP2's MixedPrecisionPolicy:
        # cast(base + v) in the compute dtype, as the cast of a dense W + S would be)
        values = full_tensor(values.detach())  # (FSDP2 shards the values too)
        acc = accumulate_dtype(w.dtype)  # as every backend's scatter_merge_ computes it
        at.put(self.layer.delta_indices, (base.to(acc) + values.to(base.device, acc)).to(w.dtype))

    def sync(self, values: torch.Tensor, backend: str) -> None:
        """Make W hold cast(base + v) for ``values`` (see the module docstring for when it skips). The
        stamp is taken before the write, so a change racing with it is caught at the next call."""
        if torch.compiler.is_compiling():
            base = self._at.base()
            torch.ops.apet.scatter_merge_(self._at.storage(write=True), self.layer.delta_indices, base, values.detach(),
                                          backend)
            return
        stamp = None
        if values.device.type == "cpu" and backend == "native" and values.is_contiguous():
            from .ops.native import fingerprint
            w = self.layer.weight
            stamp = (fingerprint(values.detach()), w.data_ptr(), w._version)
            if stamp == self.written:
                return
        self.write(values, backend)
        self.written = stamp

    @contextlib.contextmanager
    def pure(self, values: torch.Tensor, backend: str):
        """W holds the pure weight inside the block and cast(base + v) again after it."""
        self.restore()
        try:
            yield self.layer.weight_oi()
        finally:
            self.write(values, backend)

    def structural_change(self) -> None:
        """The positions or the adapter merged into W are about to change: graphs that saved W must not
        run their backward against the new W (autograd's version check refuses them)."""
        self.written = None
        weight = self.layer.weight
        if not weight.is_meta:
            torch.autograd.graph.increment_version(weight)


class LinearOverBaseWeight(torch.autograd.Function):
    """x W0^T + b for a merged layer (disabled: the base output), exactly and without an out x in copy: W0's K
    entries are written into W around each GEMM (forward and dx) and W + S is written back right after."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        with MergedWeight.of(layer).pure(layer.delta_values, layer._backend_name()) as w:
            return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        layer = ctx.layer
        if ctx.needs_input_grad[0]:
            with MergedWeight.of(layer).pure(layer.delta_values, layer._backend_name()) as w:
                dx = dy @ (w if w.dtype == dy.dtype else w.to(dy.dtype))  # (an autocast forward: dy in its dtype)
        if ctx.needs_input_grad[1]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, db, None
