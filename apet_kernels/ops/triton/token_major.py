"""Token-major SDDMM: dv[k] = sum_t dy[t, r_k] x[t, c_k], reading dy and x where they lie (no transposes).

Why this shape (issue 22): the column kernel in ``kernels.py`` (apet_kernels.ops.triton.kernels) transposes x on every call and then reads one
whole column of x per delta, so x crosses memory about (K / in) + 2 times. Here a program owns a chunk of the
row-sorted deltas and a block of tokens. Per tile of BLOCK_T tokens it stages the tile's whole rows of x and
the chunk's BLOCK_R columns of dy (both coalesced, token-major) and gathers every delta's pair from the staged
tiles, accumulating in fp32. x is then read once per chunk (from L2 after the first), dy once.

Chunks are large on purpose (up to ``MAX_CHUNK`` deltas): every chunk re-stages x, so fewer chunks means
fewer reads; the GPU is filled by splitting the tokens instead. Token blocks write partial sums; the last
block of a chunk to finish (a counter per chunk) adds them in block order, so the result does not depend on
which block finishes last, and resets the counter for the next call. No second launch, no host sync.

Every table (chunks, packed indices, counters) is built once per set of indices, on the first call with a
layout's ``row_ptr``, and cached for that tensor's lifetime: a call only does integer arithmetic on the host.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .kernels import INTERPRET, _num_sms, token_bucket

MAX_CHUNK = 2048         # deltas per chunk: x is re-staged once per chunk
STAGE_ELEMENTS = 16384   # x and dy elements staged per token tile (registers / shared memory on a GPU)
MAX_STAGED_IN = 1 << 14  # wider inputs use the column kernel (a token row of x must fit the stage)
MAX_BLOCK_R = 1 << 12    # rows of dy staged per chunk


class ChunkTables(NamedTuple):
    chunk_ptr: torch.Tensor   # (n_chunks + 1,) int32: chunk i holds deltas chunk_ptr[i] .. chunk_ptr[i + 1]
    chunk_row: torch.Tensor   # (n_chunks,) int32: first row of chunk i's block of block_r rows
    packed: torch.Tensor      # (K,) int32: column * block_r + row - chunk_row
    counters: torch.Tensor    # (n_chunks,) int32, zero between calls: token blocks done per chunk
    block_r: int
    block_j: int

    @property
    def n_chunks(self) -> int:
        return self.counters.numel()


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def build_chunk_tables(indices: torch.Tensor, row_ptr: torch.Tensor, in_features: int,
                       max_chunk: int = MAX_CHUNK) -> ChunkTables:
    """Cut the row-sorted deltas into chunks of at most ``block_j`` deltas inside one block of ``block_r`` rows.

    block_r is chosen so that a block holds about ``max_chunk`` deltas on average; a block with more is cut into
    equal pieces. One host sync (the chunk count), at build time only."""
    n_rows, k = row_ptr.numel() - 1, indices.numel()
    device = indices.device
    block_j = min(triton.next_power_of_2(max(k, 1)), triton.next_power_of_2(max_chunk))
    block_r = min(triton.next_power_of_2(n_rows), MAX_BLOCK_R, max(1, _pow2_at_most(block_j * n_rows // max(k, 1))))
    if in_features * block_r >= 2 ** 31:
        raise ValueError(f"packed indices need in_features * block_r < 2**31 (in {in_features}, block_r {block_r})")
    n_blocks = triton.cdiv(n_rows, block_r)
    starts = torch.arange(n_blocks + 1, device=device) * block_r
    bounds = row_ptr.long()[starts.clamp_(max=n_rows)]
    counts = bounds[1:] - bounds[:-1]
    pieces = (counts + block_j - 1) // block_j                     # 0 for an empty block
    block_of = torch.repeat_interleave(torch.arange(n_blocks, device=device), pieces)
    first_piece = torch.cumsum(pieces, 0) - pieces
    piece = torch.arange(block_of.numel(), device=device) - first_piece[block_of]
    # equal pieces: chunk i of a block with n pieces starts at count * i // n
    chunk_start = bounds[block_of] + counts[block_of] * piece // pieces[block_of]
    chunk_ptr = torch.cat([chunk_start, torch.full((1,), k, device=device, dtype=torch.long)])
    idx = indices.long()
    rows, cols = idx // in_features, idx % in_features
    packed = cols * block_r + rows % block_r
    return ChunkTables(chunk_ptr.to(torch.int32), (block_of * block_r).to(torch.int32), packed.to(torch.int32),
                       torch.zeros(block_of.numel(), dtype=torch.int32, device=device), block_r, block_j)


_TABLES: dict[int, tuple] = {}


def chunk_tables(indices: torch.Tensor, row_ptr: torch.Tensor, in_features: int) -> ChunkTables:
    """The tables for this layout, built on first use and dropped with ``row_ptr``.

    Keyed on the row_ptr tensor itself (layouts are rebuilt as new tensors when positions change), checked
    against the indices' identity and both tensors' in-place versions so a stale table is never used."""
    key = id(row_ptr)
    stamp = (indices.data_ptr(), indices.numel(), indices._version, row_ptr._version, in_features)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is row_ptr and hit[1] == stamp:
        return hit[2]
    tables = build_chunk_tables(indices, row_ptr, in_features)
    if hit is None or hit[0]() is not row_ptr:
        weakref.finalize(row_ptr, _TABLES.pop, key, None)
    _TABLES[key] = (weakref.ref(row_ptr), stamp, tables)
    return tables


_CHOICE: list[str | None] = [None]  # set by `chosen` (benchmarks); None: the environment decides


def applies(x: torch.Tensor) -> bool:
    """Whether the Triton backend's SDDMM is this kernel: ``APET_TRITON_SDDMM=tokens`` (the column kernel stays
    the default until a GPU run measures both; bench/gpu_check.sh times them side by side) and x's rows fit."""
    choice = _CHOICE[0] or os.environ.get("APET_TRITON_SDDMM", "columns")
    return choice == "tokens" and x.shape[1] <= MAX_STAGED_IN


@contextlib.contextmanager
def chosen(walk: str):
    """Within the block the Triton SDDMM walks ``"tokens"`` or ``"columns"`` whatever the environment says."""
    if walk not in ("tokens", "columns"):
        raise ValueError(f"the Triton SDDMM walks 'tokens' or 'columns', not {walk!r}")
    before, _CHOICE[0] = _CHOICE[0], walk
    try:
        yield
    finally:
        _CHOICE[0] = before


def _configs():
    if INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]


@triton.autotune(configs=_configs(), key=["K", "IN_P2", "BLOCK_R", "BLOCK_J", "T_BUCKET"],
                 reset_to_zero=["counters"])
@triton.jit
def _sddmm_token_major_kernel(dy, x, packed, chunk_ptr, chunk_row, partial, counters, out,
                              T, T_BLOCK, N_SPLIT, K, N_ROWS, IN, s_dy, s_x, T_BUCKET,
                              IN_P2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_T: tl.constexpr, SPLIT: tl.constexpr):
    pid_c, pid_t = tl.program_id(0), tl.program_id(1)
    k0 = tl.load(chunk_ptr + pid_c)
    k1 = tl.load(chunk_ptr + pid_c + 1)
    r0 = tl.load(chunk_row + pid_c)
    offs_j = k0 + tl.arange(0, BLOCK_J)
    mj = offs_j < k1
    pk = tl.load(packed + offs_j, mask=mj, other=0)
    col = tl.broadcast_to((pk // BLOCK_R)[None, :], (BLOCK_T, BLOCK_J))
    row = tl.broadcast_to((pk % BLOCK_R)[None, :], (BLOCK_T, BLOCK_J))
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_i = tl.arange(0, IN_P2)
    t_start = pid_t * T_BLOCK
    t_end = tl.minimum(t_start + T_BLOCK, T)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mt = offs_t < t_end
        d = tl.load(dy + offs_t[:, None] * s_dy + offs_r[None, :],
                    mask=mt[:, None] & (offs_r[None, :] < N_ROWS), other=0.0)
        xs = tl.load(x + offs_t[:, None] * s_x + offs_i[None, :], mask=mt[:, None] & (offs_i[None, :] < IN),
                     other=0.0)
        # products of half-precision values are exact in fp32; the sum is fp32
        acc += tl.sum(tl.gather(d, row, axis=1).to(tl.float32) * tl.gather(xs, col, axis=1).to(tl.float32), axis=0)
    if SPLIT:
        tl.store(partial + pid_t.to(tl.int64) * K + offs_j, acc, mask=mj)
        tl.debug_barrier()  # every thread's partial is stored before the counter says so
        done = tl.atomic_add(counters + pid_c, 1, sem="acq_rel")
        if done == N_SPLIT - 1:
            tl.debug_barrier()
            total = tl.zeros([BLOCK_J], dtype=tl.float32)
            ptrs = partial + offs_j
            for _ in range(0, N_SPLIT):  # block order: deterministic whatever block finished last
                total += tl.load(ptrs, mask=mj, other=0.0, cache_modifier=".cg")
                ptrs += K
            tl.store(out + offs_j, total, mask=mj)
            tl.atomic_xchg(counters + pid_c, 0)
    else:
        tl.store(out + offs_j, acc, mask=mj)


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor,
          out: torch.Tensor | None = None, tables: ChunkTables | None = None) -> torch.Tensor:
    """dv (K, fp32) by the token-major kernel. ``tables`` defaults to the cached ones of this layout."""
    n_k, (n_t, n_rows), in_features = indices.numel(), dy.shape, x.shape[1]
    if out is None:
        out = torch.empty(n_k, dtype=torch.float32, device=dy.device)
    if n_k == 0:
        return out
    if n_t == 0:
        return out.zero_()
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    if tables is None:
        tables = chunk_tables(indices, row_ptr, in_features)
    in_p2 = triton.next_power_of_2(in_features)
    block_t = max(1, min(16, _pow2_at_most(STAGE_ELEMENTS // (in_p2 + tables.block_r))))
    # split the tokens until the chunks x token blocks fill the GPU (4 programs per SM)
    n_split = max(1, min(triton.cdiv(n_t, block_t), triton.cdiv(4 * _num_sms(dy.device), tables.n_chunks)))
    t_block = triton.cdiv(triton.cdiv(n_t, n_split), block_t) * block_t
    n_split = triton.cdiv(n_t, t_block)
    partial = out if n_split == 1 else torch.empty(n_split * n_k, dtype=torch.float32, device=dy.device)
    _sddmm_token_major_kernel[(tables.n_chunks, n_split)](
        dy, x, tables.packed, tables.chunk_ptr, tables.chunk_row, partial, tables.counters, out,
        n_t, t_block, n_split, n_k, n_rows, in_features, dy.stride(0), x.stride(0), token_bucket(n_t),
        IN_P2=in_p2, BLOCK_R=tables.block_r, BLOCK_J=tables.block_j, BLOCK_T=block_t, SPLIT=n_split > 1)
    return out
