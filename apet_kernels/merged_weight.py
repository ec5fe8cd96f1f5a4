"""What a layer's frozen weight W holds at its active adapter's K positions, and the only code that
reads or writes W there.

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

from .errors import ApetStateError
from .linear_like import stored_weight
from .ops.dispatch import implementation
from .ops.reference import accumulate_dtype
from .quantized import values_at
from .sharded import full_tensor, is_dtensor, local_block


def _sharded(w: torch.Tensor):
    """For a DTensor (FSDP2's sharded parameter, between steps): its local tensor and the block [r0, r1) x [c0, c1)
    of the whole stored tensor it holds; None for a plain tensor."""
    if not is_dtensor(w):
        return None
    local, offset, shape = local_block(w)
    return local, offset[0], offset[0] + shape[0], offset[1], offset[1] + shape[1]


class MergedWeight:
    """The merged-weight state of one SparseDeltaLinear (``layer``): stale base, last write."""

    def __init__(self, layer):
        self.layer = layer
        self.stale = True  # base not read yet (a meta-device weight, or positions that just moved)
        self.written = None  # stamp of the last write that sync() may skip against

    # -- W's storage at the positions
    def _stored(self, write: bool) -> torch.Tensor:
        w = stored_weight(self.layer.base_layer)
        if write and not isinstance(w, torch.nn.Parameter):
            raise ApetStateError("this layer's weight is now computed from several tensors (a parametrization such as "
                                 "weight_norm added after merging): W + S cannot be written or restored there; remove "
                                 "the parametrization (parametrize.remove_parametrizations) first")
        return w

    def storage(self, write: bool = False) -> torch.Tensor:
        """W's data as (out, in) (a view for GPT-2's Conv1D): writes here never touch autograd. Where the weight
        came to be computed from another Parameter after patching (pruned, parametrized), that Parameter."""
        w = self._stored(write).data
        return w.t() if self.layer.weight_transposed else w

    def _rows_cols(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.long()
        in_features = self.layer.in_features
        return idx // in_features, idx % in_features

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows_cols(self.layer.delta_indices)

    def _local(self, w: torch.Tensor, indices: torch.Tensor):
        """A sharded weight's local tensor, as (out, in), the local (row, col) of the positions it holds and which
        of ``indices`` those are."""
        local, s0, s1, t0, t1 = _sharded(w)
        r, c = self._rows_cols(indices.to(local.device))
        if self.layer.weight_transposed:  # GPT-2's Conv1D stores (in, out): its blocks are of columns then rows
            inside = (c >= s0) & (c < s1) & (r >= t0) & (r < t1)
            return local.t(), r[inside] - t0, c[inside] - s0, inside
        inside = (r >= s0) & (r < s1) & (c >= t0) & (c < t1)
        return local, r[inside] - s0, c[inside] - t0, inside

    @torch.no_grad()
    def _put(self, indices: torch.Tensor, content: torch.Tensor) -> None:
        """W[indices] = content (one value per position, cast to W's dtype), into a plain weight or into the
        local block of a sharded one (each rank writes the positions it holds)."""
        w = self._stored(write=True)
        if _sharded(w) is None:
            storage = self.storage(write=True)
            storage.index_put_(self._rows_cols(indices.to(storage.device)), content.to(storage.device, storage.dtype))
            return
        local, r, c, inside = self._local(w, indices)
        local.index_put_((r, c), content.to(local.device)[inside].to(local.dtype))

    @torch.no_grad()
    def _get(self, indices: torch.Tensor) -> torch.Tensor:
        """W at the positions; a sharded weight is gathered by every rank together (a collective, one layer at a
        time: a switch of adapters or a regrowth under FSDP2 runs on every rank anyway)."""
        w = self._stored(write=False)
        if _sharded(w) is None:
            return self.storage()[self._rows_cols(indices.to(w.device))]
        full = w.full_tensor()
        return (full.t() if self.layer.weight_transposed else full)[self._rows_cols(indices.to(full.device))]

    @torch.no_grad()
    def read_base(self) -> None:
        """The active adapter's base = W at its positions; W must hold the pure weight there."""
        layer = self.layer
        self.written = None
        if layer.weight.is_meta or layer.delta_indices.is_meta:
            return  # nothing to read yet: a materialization or a load reads it (the base stays stale)
        if layer.quantization is not None:
            base = values_at(layer.base_layer, layer.delta_indices)  # one dequantized copy of the layer, freed
        else:
            base = self._get(layer.delta_indices)
        delta = layer._active
        if delta.base.shape == base.shape and delta.base.dtype == base.dtype and delta.base.device == base.device:
            delta.base.copy_(base)
        else:
            delta.base = base
        self.stale = False

    def base(self) -> torch.Tensor:
        """W's own values at the tuned positions, read first if still unread."""
        if self.stale:
            self.read_base()
        return self.layer._active.base

    def restore(self) -> None:
        """W[p] = base itself: the pure weight, bit-exact."""
        self.written = None
        if not self.stale:
            self._put(self.layer.delta_indices, self.layer._active.base)

    def restore_at(self, indices: torch.Tensor, base: torch.Tensor) -> None:
        """W[indices] = base: a loaded weight saved merged at other positions (another adapter's) made pure."""
        self.written = None
        self._put(indices, base)

    @torch.no_grad()
    def write(self, values: torch.Tensor, backend: str) -> None:
        """W[p] = cast(base + v): K writes through the backend's own scatter (no autograd); a sharded weight's
        local block gets its own positions."""
        base = self.base()
        w = self._stored(write=True)
        if _sharded(w) is None and w.dtype == base.dtype:
            implementation(backend).scatter_merge_(self.storage(write=True), self.layer.delta_indices, base,
                                                   values.detach())
            return
        # a sharded weight, or a gathered one in another dtype than its shards (FSDP2's MixedPrecisionPolicy:
        # cast(base + v) in the compute dtype, as the cast of a dense W + S would be)
        values = full_tensor(values.detach())  # (FSDP2 shards the values too)
        acc = accumulate_dtype(w.dtype)  # as every backend's scatter_merge_ computes it
        self._put(self.layer.delta_indices, (base.to(acc) + values.to(base.device, acc)).to(w.dtype))

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
