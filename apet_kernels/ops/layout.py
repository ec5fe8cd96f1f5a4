"""Index orderings the kernels walk, computed once per set of indices (not per step).

Sorted row-major indices are already grouped by row, so ``row_ptr`` (CSR offsets,
length out+1) is a search. ``spmm_t`` walks the deltas grouped by column instead:
``col_perm`` lists the deltas in column order (stable, so rows stay ascending within
a column) and ``col_ptr`` (length in+1) its offsets.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ApetValueError


class DeltaLayout(NamedTuple):
    row_ptr: torch.Tensor
    col_ptr: torch.Tensor | None
    col_perm: torch.Tensor | None


def build_layout(indices: torch.Tensor, shape: tuple[int, int], columns: bool = True) -> DeltaLayout:
    """Row offsets, and (with ``columns``) the column order and its offsets."""
    out_features, in_features = (int(s) for s in shape)
    idx = indices.long()
    rows, cols = idx // in_features, idx % in_features
    # int32 offsets are enough: at most K <= out*in entries, and int32 indices imply < 2**31
    ptr_dtype = indices.dtype
    row_ptr = _offsets(rows, out_features)
    if not columns:
        return DeltaLayout(row_ptr.to(ptr_dtype), None, None)
    col_perm = torch.sort(cols, stable=True).indices
    return DeltaLayout(row_ptr.to(ptr_dtype), _offsets(cols, in_features).to(ptr_dtype), col_perm.to(ptr_dtype))


def _offsets(groups: torch.Tensor, n: int) -> torch.Tensor:
    """CSR offsets (length n + 1) of entries grouped by ``groups`` in [0, n): a count and a running sum
    (a searchsorted of n + 1 boundaries cost 10-20x more on the CPU, and adapter switches rebuild this)."""
    if groups.is_meta:  # (meta-device construction: shapes only; bincount has no meta kernel)
        return torch.empty(n + 1, dtype=torch.long, device="meta")
    counts = torch.bincount(groups, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


class SlotTable(NamedTuple):
    """Several adapters' deltas on one layer, stacked by slot for slot_spmm_ (serving): slot s's first
    row_ptr[s, -1] entries of indices[s] / values[s] hold its deltas, sorted by row; an empty slot has none."""
    indices: torch.Tensor  # (slots, capacity)
    values: torch.Tensor  # (slots, capacity)
    row_ptr: torch.Tensor  # (slots, out + 1)


def stack_slots(slots: list, shape: tuple[int, int], capacity: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> SlotTable:
    """A SlotTable of ``slots`` (each None or (indices, values) into ``shape``), ``capacity`` entries per slot."""
    n = len(slots)
    index_dtype = torch.int32 if shape[0] * shape[1] < 2 ** 31 else torch.int64  # (as the layers' own indices)
    indices = torch.zeros(n, capacity, dtype=index_dtype, device=device)
    values = torch.zeros(n, capacity, dtype=dtype, device=device)
    row_ptr = torch.zeros(n, shape[0] + 1, dtype=index_dtype, device=device)
    for s, slot in enumerate(slots):
        if slot is None:
            continue
        idx, val = slot
        if idx.numel() > capacity:
            raise ApetValueError(f"slot {s} holds {idx.numel()} deltas, over the table's capacity {capacity}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape[0] * shape[1]):
            raise ApetValueError(f"slot {s} holds positions outside a {tuple(shape)} weight")
        order = torch.argsort(idx)
        idx = idx[order].to(device)
        indices[s, :idx.numel()] = idx.to(index_dtype)
        values[s, :idx.numel()] = val[order].to(device, dtype)
        row_ptr[s] = _offsets(idx // shape[1], shape[0]).to(index_dtype)
    return SlotTable(indices, values, row_ptr)
