"""What a layer's frozen weight W holds at its active adapter's K positions, and the only code that
reads or writes W there.

The merged strategy keeps ``cast(base + v)`` in W's own storage, so the forward and dx are the base
layer's own GEMMs. ``base`` (the layer's ``delta_base`` buffer) is W's original value at each tuned
position. Invariants (tests/test_merged_state.py):

- ``base`` is read from W only while W is pure at those positions;
- after ``write(v)``: W[p] == cast(base + v), bit for bit; after ``restore()``: W[p] == base, bit for bit
  (-0.0 included: base itself is written, never base + 0);
- neither moves W's version counter (writes go through ``.data``), so a graph saved before them stays
  valid (a second forward before a backward, a reference pass); a *structural* change (other positions,
  another adapter, unmerge) does move it, so a backward of a forward taken before the change fails in
  autograd's own check instead of computing dx from another weight;
- ``sync(v)`` skips the write only when v's content hash and W's storage and version equal those of
  the last write (eagerly on the CPU with the native extension; elsewhere it always writes: one launch).
"""

from __future__ import annotations

import contextlib

import torch

from .linear_like import stored_weight
from .ops.dispatch import implementation
from .quantized import values_at


class MergedWeight:
    """The merged-weight state of one SparseDeltaLinear (``layer``): stale base, last write."""

    def __init__(self, layer):
        self.layer = layer
        self.stale = True  # base not read yet (a meta-device weight, or positions that just moved)
        self.written = None  # stamp of the last write that sync() may skip against

    # -- W's storage at the positions
    def storage(self, write: bool = False) -> torch.Tensor:
        """W's data as (out, in) (a view for GPT-2's Conv1D): writes here never touch autograd. Where the weight
        came to be computed from another Parameter after patching (pruned, parametrized), that Parameter."""
        w = stored_weight(self.layer.base_layer)
        if write and not isinstance(w, torch.nn.Parameter):
            raise RuntimeError("this layer's weight is now computed from several tensors (a parametrization such as "
                               "weight_norm added after merging): W + S cannot be written or restored there; remove "
                               "the parametrization (parametrize.remove_parametrizations) first")
        w = w.data
        return w.t() if self.layer.weight_transposed else w

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.layer.delta_indices.long()
        in_features = self.layer.in_features
        return idx // in_features, idx % in_features

    @torch.no_grad()
    def read_base(self) -> None:
        """delta_base = W at the positions; W must hold the pure weight there."""
        layer = self.layer
        self.written = None
        if layer.weight.is_meta or layer.delta_indices.is_meta:
            return  # nothing to read yet: a materialization or a load reads it (the base stays stale)
        if layer.quantization is not None:
            base = values_at(layer.base_layer, layer.delta_indices)  # one dequantized copy of the layer, freed
        else:
            base = self.storage()[self._positions()]
        current = layer.delta_base
        if current.shape == base.shape and current.dtype == base.dtype and current.device == base.device:
            current.copy_(base)
        else:
            layer.delta_base = base
        self.stale = False

    def base(self) -> torch.Tensor:
        """W's own values at the tuned positions, read first if still unread."""
        if self.stale:
            self.read_base()
        return self.layer.delta_base

    @torch.no_grad()
    def restore(self) -> None:
        """W[p] = base itself: the pure weight, bit-exact."""
        self.written = None
        if not self.stale:
            self.storage(write=True).index_put_(self._positions(), self.layer.delta_base)

    @torch.no_grad()
    def restore_at(self, indices: torch.Tensor, base: torch.Tensor) -> None:
        """W[indices] = base: a loaded weight saved merged at other positions (another adapter's) made pure."""
        self.written = None
        idx = indices.long()
        in_features = self.layer.in_features
        storage = self.storage(write=True)
        storage.index_put_((idx // in_features, idx % in_features), base.to(storage.device, storage.dtype))

    def write(self, values: torch.Tensor, backend: str) -> None:
        """W[p] = cast(base + v): K writes through the backend's own scatter (no autograd)."""
        base = self.base()
        implementation(backend).scatter_merge_(self.storage(write=True), self.layer.delta_indices, base,
                                               values.detach())

    def sync(self, values: torch.Tensor, backend: str) -> None:
        """Make W hold cast(base + v) for ``values`` (see the module docstring for when it skips). The
        stamp is taken before the write, so a change racing with it is caught at the next call."""
        if torch.compiler.is_compiling():
            base = self.base()
            torch.ops.apet.scatter_merge_(self.storage(write=True), self.layer.delta_indices, base, values.detach(),
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
