"""Pure-PyTorch implementation of the op set: the oracle every kernel is tested against.

All inputs are 2-D and token-major: x is (T, in), dy is (T, out). Each op walks the
deltas in chunks of CHUNK so its extra memory is O(CHUNK * T) plus one fp32 buffer
the size of its output, never O(out * in). Accumulation is always in fp32. The ops take
the same arguments as the kernels' (the index orderings included) but need no ordering.

Rows of x^T and dy^T are contiguous, so the gathers below read whole rows; one
transpose per call is much cheaper on the CPU than T strided column gathers.
"""

from __future__ import annotations

import torch

CHUNK = 2048


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 data; fp64 stays fp64 (float64 gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _rows_cols(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = indices.long()
    return idx // in_features, idx % in_features


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, row_ptr=None) -> torch.Tensor:
    """dv[k] = sum_t dy[t, r_k] * x[t, c_k], in fp32 (fp64 for fp64 inputs)."""
    acc = accumulate_dtype(dy.dtype)
    dv = torch.empty(indices.numel(), dtype=acc, device=dy.device)
    if indices.numel() == 0:
        return dv
    dy_t, x_t = dy.t().contiguous(), x.t().contiguous()
    for s in range(0, indices.numel(), CHUNK):
        r, c = _rows_cols(indices[s:s + CHUNK], x.shape[1])
        a = dy_t.index_select(0, r).to(acc)
        b = x_t.index_select(0, c).to(acc)
        dv[s:s + CHUNK] = torch.linalg.vecdot(a, b)
    return dv


def _scatter_add_rows(out: torch.Tensor, src_t: torch.Tensor, src_idx: torch.Tensor,
                      dst_idx: torch.Tensor, values: torch.Tensor) -> None:
    """out[:, dst_k] += v_k * src_t[src_k, :]   (out is (T, n_dst), src_t is (n_src, T))."""
    acc = accumulate_dtype(out.dtype)
    acc_t = torch.zeros(out.shape[1], out.shape[0], dtype=acc, device=out.device)
    for s in range(0, values.numel(), CHUNK):
        gathered = src_t.index_select(0, src_idx[s:s + CHUNK]).to(acc)
        acc_t.index_add_(0, dst_idx[s:s + CHUNK], gathered * values[s:s + CHUNK, None].to(acc))
    out.copy_((out.to(acc) + acc_t.t()).to(out.dtype))


def spmm_(out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
          row_ptr=None) -> None:
    """out[:, r] += sum_{k in row r} v_k x[:, c_k]   (out is (T, out_features))."""
    if indices.numel() == 0:
        return
    r, c = _rows_cols(indices, x.shape[1])
    _scatter_add_rows(out, x.t().contiguous(), c, r, values)


def spmm_t_(out: torch.Tensor, dy: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
            col_ptr=None, col_perm=None) -> None:
    """out[:, c] += sum_{k in col c} v_k dy[:, r_k]   (out is (T, in_features))."""
    if indices.numel() == 0:
        return
    r, c = _rows_cols(indices, out.shape[1])
    _scatter_add_rows(out, dy.t().contiguous(), r, c, values)


def slot_spmm_(out: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, indices: torch.Tensor,
               values: torch.Tensor, row_ptr: torch.Tensor) -> None:
    """out[t] += x[t] S_slot(t)^T for every token t whose slot is >= 0 (the stacked table of ops.layout.SlotTable)."""
    for slot in range(indices.shape[0]):
        rows = (token_slots == slot).nonzero().squeeze(1)
        k = int(row_ptr[slot, -1])
        if rows.numel() and k:
            part = out.index_select(0, rows)
            spmm_(part, x.index_select(0, rows), indices[slot, :k], values[slot, :k])
            out.index_copy_(0, rows, part)


def scatter_merge_(weight: torch.Tensor, indices: torch.Tensor, base: torch.Tensor,
                   values: torch.Tensor) -> None:
    """weight[p] = cast(base + v). ``weight`` is the (out, in) view; strides may be transposed."""
    if indices.numel() == 0:
        return
    r, c = _rows_cols(indices, weight.shape[1])
    acc = accumulate_dtype(weight.dtype)
    weight.index_put_((r, c), (base.to(acc) + values.to(acc)).to(weight.dtype))
