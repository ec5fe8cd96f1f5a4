"""One adapter's deltas on one layer, as module state (seen by ``.to()``, state dicts, DCP, DDP/FSDP, deep copies)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.layout import DeltaLayout, build_layout


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
