"""Triton kernels for sddmm, spmm and spmm_t.

Layout choices (why):
- The kernels gather whole token rows of x^T / dy^T (one transpose per call): each
  delta then reads T contiguous elements instead of T strided 2-byte reads, which on
  the CPU and GPU alike wasted a whole sector per element.
- spmm and spmm_t are one kernel: an output tile (tokens x BLOCK_D output columns)
  owns the deltas whose destination falls in it (row_ptr, or col_ptr/col_perm for
  the transpose), so there are no atomics. The deltas of a chunk are applied as a
  tensor-core product with a one-hot (chunk x BLOCK_D) matrix holding the values.
- Values stay fp32: for bf16/fp16 activations the one-hot matrix is split into a
  high and a low half in the activation dtype (two products, fp32 accumulation), so v
  is applied to ~16 bits, not rounded to 8; fp32 activations use exact fp32 dots.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import reference
from ...errors import ApetValueError

INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _exact_f32(dtype: torch.dtype) -> bool:
    """fp32 activations use fp32 dots. So does bf16 under the interpreter, whose bf16
    tl.dot returns garbage (Triton 3.8, seen here); fp16 keeps the hi/lo path there."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _configs(full: list[dict], small: dict) -> list[triton.Config]:
    """Autotune list; under the interpreter one small config keeps CI fast."""
    chosen = [small] if INTERPRET else full
    out = []
    for c in chosen:
        c = dict(c)
        warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 2)
        out.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return out


@triton.jit
def _dot_exact_values(g, v, acc, EXACT_F32: tl.constexpr):
    """acc += g @ v with g in the activation dtype and v fp32 (see module docstring)."""
    if EXACT_F32:
        acc = tl.dot(g.to(tl.float32), v, acc, input_precision="ieee")
    else:
        hi = v.to(g.dtype)
        lo = (v - hi.to(tl.float32)).to(g.dtype)
        acc = tl.dot(g, hi, acc)
        acc = tl.dot(g, lo, acc)
    return acc


# --------------------------------------------------------------------------- transpose
@triton.jit
def _transpose_kernel(src, dst, ROWS, COLS, s_src, s_dst, BLOCK: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    offs_r = pid_r * BLOCK + tl.arange(0, BLOCK)
    offs_c = pid_c * BLOCK + tl.arange(0, BLOCK)
    m = (offs_r[:, None] < ROWS) & (offs_c[None, :] < COLS)
    tile = tl.load(src + offs_r[:, None].to(tl.int64) * s_src + offs_c[None, :], mask=m)
    tl.store(dst + offs_c[:, None].to(tl.int64) * s_dst + offs_r[None, :], tl.trans(tile), mask=tl.trans(m))


def transpose(t: torch.Tensor) -> torch.Tensor:
    """Contiguous t^T of a 2-D tensor with unit column stride.

    Why not ``t.t().contiguous()``: on an H100 that strided copy took 131 us for a
    4096x4096 bf16 tensor (~0.5 TB/s) and was the largest cost of the SDDMM; a tiled
    transpose moves the same 64 MB at close to copy bandwidth.
    """
    if t.stride(1) != 1:
        t = t.contiguous()
    rows, cols = t.shape
    out = torch.empty(cols, rows, dtype=t.dtype, device=t.device)
    if t.numel():
        block = 64
        _transpose_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](
            t, out, rows, cols, t.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


# --------------------------------------------------------------------------- sddmm
@triton.autotune(
    configs=_configs([dict(BLOCK_R=16, BLOCK_J=64, BLOCK_T=64, num_warps=4),
                      dict(BLOCK_R=16, BLOCK_J=32, BLOCK_T=128, num_warps=4),
                      dict(BLOCK_R=16, BLOCK_J=128, BLOCK_T=64, num_warps=8),
                      dict(BLOCK_R=32, BLOCK_J=64, BLOCK_T=64, num_warps=4)],
                     dict(BLOCK_R=16, BLOCK_J=16, BLOCK_T=16)),
    key=["K", "N_ROWS", "T_BUCKET"])
@triton.jit
def _sddmm_kernel(dy, x_t, idx, row_ptr, partial, K, N_ROWS, T, T_CHUNK, T_BUCKET, in_features, s_dy, s_x,
                  EXACT_F32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
    """partial[pid_t, k] = sum over this program's tokens of dy[t, r_k] * x[t, c_k].

    A program owns the deltas of BLOCK_R consecutive rows. Per token tile it reads the
    (BLOCK_T, BLOCK_R) slab of dy once, coalesced and untransposed, gathers the deltas'
    rows of x^T, and forms G @ dy_slab on the tensor cores; delta k then keeps the entry
    of its own row. dy is never transposed and each of its elements is read once per
    chunk of BLOCK_J deltas.
    """
    pid_r, pid_t = tl.program_id(0), tl.program_id(1)
    r0 = pid_r * BLOCK_R
    start = tl.load(row_ptr + r0).to(tl.int64)
    end = tl.load(row_ptr + tl.minimum(r0 + BLOCK_R, N_ROWS)).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    t_start = pid_t * T_CHUNK
    t_end = tl.minimum(t_start + T_CHUNK, T)
    for j0 in range(start, end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < end
        p = tl.load(idx + offs_j, mask=mj, other=0).to(tl.int64)
        r = p // in_features
        c = p - r * in_features
        acc = tl.zeros([BLOCK_J, BLOCK_R], dtype=tl.float32)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mt = offs_t < t_end
            g = tl.load(x_t + c[:, None] * s_x + offs_t[None, :], mask=mj[:, None] & mt[None, :], other=0.0)
            d = tl.load(dy + offs_t[:, None] * s_dy + offs_r[None, :],
                        mask=mt[:, None] & (offs_r[None, :] < N_ROWS), other=0.0)
            if EXACT_F32:
                acc = tl.dot(g.to(tl.float32), d.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(g, d, acc)  # half-precision products are exact in fp32
        own = tl.sum(tl.where(r[:, None] == offs_r[None, :], acc, 0.0), axis=1)
        tl.store(partial + pid_t * K + offs_j, own, mask=mj)


def token_bucket(n_tokens: int) -> int:
    """The power of two at or above ``n_tokens``: what autotuning keys on instead of the token count itself, so
    a new sequence length re-tunes only when it crosses a power of two (each tuning stalls ~0.5 s)."""
    return 1 << max(0, int(n_tokens) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """dv[k] = sum_t dy[t, r_k] x[t, c_k] in fp32. ``out`` (K, fp32) may be given."""
    n_k, (n_t, n_rows) = indices.numel(), dy.shape
    if out is None:
        out = torch.empty(n_k, dtype=torch.float32, device=dy.device)
    if n_k == 0:
        return out
    if n_t == 0:
        return out.zero_()
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    x_t = transpose(x)
    # Split the token loop over programs when the row blocks alone cannot fill the GPU;
    # chunks are multiples of 256 so every BLOCK_T divides them.
    row_blocks = triton.cdiv(n_rows, 16)
    n_split = max(1, min(triton.cdiv(n_t, 256), triton.cdiv(4 * _num_sms(dy.device), row_blocks)))
    t_chunk = triton.cdiv(triton.cdiv(n_t, n_split), 256) * 256
    n_split = triton.cdiv(n_t, t_chunk)
    partial = out.view(1, n_k) if n_split == 1 else torch.empty(n_split, n_k, dtype=torch.float32,
                                                                 device=dy.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), n_split)
    _sddmm_kernel[grid](dy, x_t, indices, row_ptr, partial, n_k, n_rows, n_t, t_chunk, token_bucket(t_chunk),
                        x.shape[1], dy.stride(0), x_t.stride(0), EXACT_F32=_exact_f32(dy.dtype))
    if n_split > 1:
        torch.sum(partial, dim=0, out=out)
    return out


# --------------------------------------------------------------------------- spmm / spmm_t
def _fp32_tiles_that_fit(configs, named_args, **kwargs):
    """fp32 activations (EXACT_F32) multiply the one-hot values with ieee FMA dots, not tensor cores: tiles with
    BLOCK_D * BLOCK_J above 16 x 32 spilled 200-500 bytes at 255 registers on sm_90 (Triton 3.8; report in
    bench/results/compile-cpu-2026-12-05/), so fp32 autotunes over the others only."""
    if not kwargs.get("EXACT_F32"):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_J"] <= 16 * 32] or configs


@triton.autotune(
    configs=_configs([dict(BLOCK_T=128, BLOCK_D=16, BLOCK_J=32, num_warps=4),
                      dict(BLOCK_T=128, BLOCK_D=32, BLOCK_J=32, num_warps=4),
                      dict(BLOCK_T=64, BLOCK_D=16, BLOCK_J=64, num_warps=4),
                      dict(BLOCK_T=256, BLOCK_D=16, BLOCK_J=32, num_warps=8)],
                     dict(BLOCK_T=16, BLOCK_D=16, BLOCK_J=16)),
    key=["T_BUCKET", "N_DST", "K"],
    prune_configs_by={"early_config_prune": _fp32_tiles_that_fit},
    restore_value=["out"])  # the kernel accumulates into out: benchmarking must not add twice
@triton.jit
def _group_spmm_kernel(out, src_t, group_ptr, perm, idx, vals, T, T_BUCKET, N_DST, K, in_features, s_out, s_src,
                       SRC_IS_COL: tl.constexpr, USE_PERM: tl.constexpr, EXACT_F32: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[t, d] += sum over deltas j with destination d of v_j * src_t[source_j, t]."""
    pid_t, pid_d = tl.program_id(0), tl.program_id(1)
    d0 = pid_d * BLOCK_D
    start = tl.load(group_ptr + d0).to(tl.int64)
    end = tl.load(group_ptr + tl.minimum(d0 + BLOCK_D, N_DST)).to(tl.int64)
    if start < end:
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mt = offs_t < T
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j0 in range(start, end, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mj = offs_j < end
            if USE_PERM:
                j = tl.load(perm + offs_j, mask=mj, other=0).to(tl.int64)
            else:
                j = offs_j
            p = tl.load(idx + j, mask=mj, other=0).to(tl.int64)
            v = tl.load(vals + j, mask=mj, other=0.0).to(tl.float32)
            r = p // in_features
            c = p - r * in_features
            if SRC_IS_COL:
                src, dst = c, r
            else:
                src, dst = r, c
            # (BLOCK_T, BLOCK_J) tile of the gathered source rows, already transposed
            g = tl.load(src_t + src[None, :] * s_src + offs_t[:, None], mask=mj[None, :] & mt[:, None], other=0.0)
            onehot = tl.where((dst[:, None] == offs_d[None, :]) & mj[:, None], v[:, None], 0.0)
            acc = _dot_exact_values(g, onehot, acc, EXACT_F32)
        ptrs = out + offs_t[:, None] * s_out + offs_d[None, :]
        m = mt[:, None] & (offs_d[None, :] < N_DST)
        prev = tl.load(ptrs, mask=m, other=0.0)
        tl.store(ptrs, (prev.to(tl.float32) + acc).to(out.dtype.element_ty), mask=m)


def _group_spmm(out, src, indices, values, group_ptr, perm, in_features: int, src_is_col: bool) -> None:
    n_t, n_dst = out.shape
    if indices.numel() == 0 or n_t == 0:
        return
    if out.stride(1) != 1:
        raise ApetValueError("spmm output must have unit stride along its last dimension")
    src_t = transpose(src)
    vals = values.contiguous()
    grid = lambda meta: (triton.cdiv(n_t, meta["BLOCK_T"]), triton.cdiv(n_dst, meta["BLOCK_D"]))
    _group_spmm_kernel[grid](out, src_t, group_ptr, perm if perm is not None else group_ptr, indices, vals,
                             n_t, token_bucket(n_t), n_dst, indices.numel(), in_features, out.stride(0),
                             src_t.stride(0),
                             SRC_IS_COL=src_is_col, USE_PERM=perm is not None,
                             EXACT_F32=_exact_f32(src.dtype))


def spmm_(out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
          row_ptr: torch.Tensor) -> None:
    """out[:, r] += sum_{k in row r} v_k x[:, c_k] (row-grouped: each output tile owns its rows)."""
    _group_spmm(out, x, indices, values, row_ptr, None, x.shape[1], src_is_col=True)


def spmm_t_(out: torch.Tensor, dy: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
            col_ptr: torch.Tensor, col_perm: torch.Tensor) -> None:
    """out[:, c] += sum_{k in col c} v_k dy[:, r_k] (column-grouped through col_perm)."""
    _group_spmm(out, dy, indices, values, col_ptr, col_perm, out.shape[1], src_is_col=False)


# --------------------------------------------------------------------------- slot_spmm (serving)
@triton.jit
def _slot_spmm_kernel(out, x, token_slot, idx, vals, row_ptr, N_DST, K_CAP, in_features, s_out, s_x,
                      BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[t, d] += sum over the deltas of token t's slot in row d of v_j * x[t, c_j] (slot < 0: nothing)."""
    t, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    slot = tl.load(token_slot + t).to(tl.int64)
    if slot >= 0:
        d0 = pid_d * BLOCK_D
        ptr = row_ptr + slot * (N_DST + 1)
        start = tl.load(ptr + d0).to(tl.int64)
        end = tl.load(ptr + tl.minimum(d0 + BLOCK_D, N_DST)).to(tl.int64)
        if start < end:
            offs_d = d0 + tl.arange(0, BLOCK_D)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j0 in range(start, end, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                mj = offs_j < end
                p = tl.load(idx + slot * K_CAP + offs_j, mask=mj, other=0).to(tl.int64)
                v = tl.load(vals + slot * K_CAP + offs_j, mask=mj, other=0.0).to(tl.float32)
                r = p // in_features
                xv = tl.load(x + t * s_x + (p - r * in_features), mask=mj, other=0.0).to(tl.float32)
                acc += tl.sum(tl.where((r[:, None] == offs_d[None, :]) & mj[:, None], (v * xv)[:, None], 0.0), 0)
            ptrs = out + t * s_out + offs_d
            m = offs_d < N_DST
            prev = tl.load(ptrs, mask=m, other=0.0)
            tl.store(ptrs, (prev.to(tl.float32) + acc).to(out.dtype.element_ty), mask=m)


def slot_spmm_(out: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, indices: torch.Tensor,
               values: torch.Tensor, row_ptr: torch.Tensor) -> None:
    """out[t] += x[t] S_slot(t)^T for every token t whose slot is >= 0, one launch for the whole batch: several
    adapters' deltas stacked by slot (ops.layout.SlotTable: indices and values (slots, capacity), row_ptr (slots,
    out + 1)). Shapes are fixed by the table's capacity and nothing is read back to the host, so a CUDA graph can
    capture it (the serving path on a GPU; compiled for sm_80/sm_90 in CI, not yet run on a GPU)."""
    n_t, n_dst = out.shape
    n_slots, capacity = indices.shape
    if x.shape[0] != n_t or token_slots.shape != (n_t,) or values.shape != indices.shape or \
            row_ptr.shape != (n_slots, n_dst + 1):
        raise ApetValueError(f"slot_spmm_: out {tuple(out.shape)}, x {tuple(x.shape)}, token_slots "
                             f"{tuple(token_slots.shape)}, indices {tuple(indices.shape)}, values {tuple(values.shape)}, "
                             f"row_ptr {tuple(row_ptr.shape)} do not fit (one slot per token; row_ptr (slots, out + 1))")
    if n_t == 0 or capacity == 0:
        return
    if out.stride(1) != 1 or x.stride(1) != 1 or not (indices.is_contiguous() and values.is_contiguous()
                                                       and row_ptr.is_contiguous() and token_slots.is_contiguous()):
        raise ApetValueError("slot_spmm_ needs unit stride along the last dimension of out and x, and contiguous "
                             "token_slots and tables")
    grid = (n_t, triton.cdiv(n_dst, 32))
    _slot_spmm_kernel[grid](out, x, token_slots, indices, values, row_ptr, n_dst, indices.shape[1], x.shape[1],
                            out.stride(0), x.stride(0), BLOCK_D=32, BLOCK_J=32)


# --------------------------------------------------------------------------- scatter_merge
# K writes at every merged forward. index_put_ is a chain of ~7 small ops (60-90 us of host time on an H200
# per layer); the native extension's scatter is one launch. A Triton twin was written and dropped: Triton's
# interpreter casts fp32 -> bf16 by truncation, so CI could not check it against the round-to-nearest that
# the other backends (and GPUs) do.
@functools.lru_cache(maxsize=None)
def _native_scatter(device_type: str):
    """The extension's scatter where it is built with kernels for this device type, else None."""
    try:
        from .. import native
        from ..._build_info import BUILD_INFO
    except ImportError:
        return None
    return native.scatter_merge_ if device_type == "cpu" or "CUDA" in BUILD_INFO.get("kind", "") else None


def scatter_merge_(weight: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, values: torch.Tensor) -> None:
    """weight[p] = cast(base + v): the native extension's one launch where it is built (else index_put_)."""
    (_native_scatter(weight.device.type) or reference.scatter_merge_)(weight, indices, base, values)
