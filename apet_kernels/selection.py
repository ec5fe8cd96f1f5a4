"""Choosing which weight positions are tunable, in O(k) memory.

Every method returns sorted, unique, row-major flat indices. None of them ever
materialises a permutation or a mask of the whole weight, so selecting 2,000
positions of a 60000x50000 weight costs kilobytes, not gigabytes.

Determinism: the random stream is seeded from a SHA-256 of (method, seed, key,
shape, k) and drawn from torch's CPU Mersenne Twister, which gives the same
numbers on every machine. An adapter file can therefore store the seed and
regenerate the indices instead of storing them.

``magnitude_indices`` (the k entries of smallest |W|, PaFi's criterion) streams a running top-k over
row blocks of at most ``max(1, min(out // 8, 2**24 // in))`` rows (<= 64 MB of fp32); the gradient
scores of ``positions`` reuse the same streamed top-k.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping, Sequence

import torch

from ._checks import is_int, is_real
from .errors import ApetValueError
from .schemes import SCHEMES, SEEDED

METHODS = SEEDED  # seeded schemes (apet_kernels.schemes): an adapter can store the seed instead of indices
DATA_METHODS = tuple(name for name in SCHEMES if name not in SEEDED)  # from weights or data: indices are stored
BLOCK_SHAPE = (16, 16)  # tile of the `blocks` method: one tensor-core fragment

INT32_LIMIT = 2**31


def index_checksum(indices: torch.Tensor) -> str:
    """A short hash of positions (as int64, in order): what a saved adapter records to recognize them."""
    if indices.is_meta:
        raise ApetValueError("these positions are on the meta device (a model patched before its weights were "
                             "materialized): call model.to_empty(device=...) and load its weights first")
    return hashlib.sha256(indices.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()[:16]


def index_dtype(numel: int) -> torch.dtype:
    """int32 while every flat position fits, else int64 (the int32 kernels are the fast ones)."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def seeded_generator(method: str, seed: int, key: str, shape, k: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments (the same draws on any machine)."""
    tag = f"apet:{method}:{int(seed)}:{key}:{tuple(int(s) for s in shape)}:{int(k)}"
    digest = hashlib.sha256(tag.encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


def _sample_distinct(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """m distinct integers drawn uniformly from [0, n), in random order, int64.

    Draws with replacement, keeps the distinct values and shuffles a uniform
    m-subset out of them: by symmetry every m-subset is equally likely. Memory
    O(m). When m is more than half of n the output is O(n) anyway, so a
    permutation is cheaper than rejection.
    """
    if m == 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * m > n:
        return torch.randperm(n, generator=gen)[:m]
    found = torch.empty(0, dtype=torch.int64)
    while found.numel() < m:
        # expected distinct fraction of draws is > 1/2 here; 1.3x + slack rarely loops
        draws = torch.randint(0, n, (int(1.3 * (m - found.numel())) + 16,), generator=gen)
        found = torch.unique(torch.cat([found, draws]))
    # unique() sorts; a random m-subset in random order keeps the result uniform
    return found[torch.randperm(found.numel(), generator=gen)[:m]]


def _check_args(shape, k: int, method: str) -> tuple[int, int]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) and not isinstance(shape, torch.Size) or \
            len(shape) != 2 or not all(is_int(s) for s in shape):
        raise ApetValueError(f"select_indices expects a 2-D weight shape (out, in) of ints, got {shape!r}")
    rows, cols = (int(s) for s in shape)
    if rows <= 0 or cols <= 0:
        raise ApetValueError(f"weight shape must be positive, got {tuple(shape)}")
    if not is_int(k):
        raise ApetValueError(f"k must be an int, got {k!r}")
    if k < 0 or k > rows * cols:
        raise ApetValueError(f"k={k} is out of range for a weight of shape {tuple(shape)} (0 <= k <= {rows * cols})")
    if method not in METHODS:
        raise ApetValueError(f"unknown selection method {method!r}; choose one of {METHODS}")
    return rows, cols


def _whole_lines(n_lines: int, line_len: int, k: int, gen) -> torch.Tensor:
    """(line, offset) pairs filling ceil(k/line_len) random lines, truncated to k."""
    chosen = _sample_distinct(n_lines, math.ceil(k / line_len), gen)
    offsets = torch.arange(line_len, dtype=torch.int64)
    return (chosen[:, None] * line_len + offsets[None, :]).reshape(-1)[:k]


def _blocks(rows: int, cols: int, k: int, gen) -> torch.Tensor:
    bh, bw = min(BLOCK_SHAPE[0], rows), min(BLOCK_SHAPE[1], cols)
    grid_r, grid_c = math.ceil(rows / bh), math.ceil(cols / bw)
    n_tiles = grid_r * grid_c
    want = math.ceil(k / (bh * bw))
    while True:
        # edge tiles are smaller, so take a few spare tiles and cut at k
        tiles = _sample_distinct(n_tiles, min(n_tiles, want), gen)
        tr, tc = tiles // grid_c, tiles % grid_c
        r = tr[:, None, None] * bh + torch.arange(bh)[None, :, None]
        c = tc[:, None, None] * bw + torch.arange(bw)[None, None, :]
        valid = ((r < rows) & (c < cols)).reshape(-1)
        flat = (r * cols + c).reshape(-1)[valid]
        if flat.numel() >= k or want >= n_tiles:
            return flat[:k]
        want = min(n_tiles, 2 * want)


def select_indices(shape: Sequence[int], k: int, *, method: str = "random", seed: int = 0,
                   key: str = "", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted unique flat (row-major) indices of ``k`` tunable positions in a weight of ``shape``.

    method: ``random`` (uniform, the paper's APET), ``rows`` / ``cols`` (whole random
    rows / columns, the last one cut at k), ``blocks`` (random 16x16 tiles), ``magnitude``
    (the k entries of smallest |W| of ``weight``, given as (out, in); PaFi's criterion;
    streamed over row blocks). ``gradient`` needs data: ``get_apet_model(..., calibration=...)``.
    ``key`` (e.g. the module's qualified name) decorrelates layers that share a seed.
    Returns int32 while the weight has fewer than 2**31 elements, else int64.
    """
    if method == "magnitude":
        _check_args(shape, k, "random")
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(int(s) for s in shape):
            raise ApetValueError(f"method='magnitude' needs weight=, the (out, in) weight tensor of shape "
                                 f"{tuple(shape)}, got {_described(weight)}")
        return magnitude_indices(weight, k)
    if method == "gradient":
        raise ApetValueError("method='gradient' needs calibration data: get_apet_model(model, config, calibration=batches)")
    rows, cols = _check_args(shape, k, method)
    if not is_int(seed):
        raise ApetValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(key, str):
        raise ApetValueError(f"key must be a string (e.g. the module's qualified name), got {key!r}")
    gen = seeded_generator(method, seed, key, (rows, cols), k)
    with torch.device("cpu"):  # drawn on the CPU whatever the default device (a model built under torch.device("meta"))
        if method == "random":
            flat = _sample_distinct(rows * cols, k, gen)
        elif method == "rows":
            flat = _whole_lines(rows, cols, k, gen)
        elif method == "cols":
            pos = _whole_lines(cols, rows, k, gen)  # pos = col * rows + row
            flat = (pos % rows) * cols + pos // rows
        elif method == "blocks":
            flat = _blocks(rows, cols, k, gen)
        else:  # a seeded scheme in schemes.SCHEMES without its branch here must not fall back to another's positions
            raise ApetValueError(f"select_indices has no code for the seeded scheme {method!r}: add its branch "
                                 "(CONTRIBUTING.md, 'Adding a position scheme')")
        return torch.sort(flat).values.to(index_dtype(rows * cols))


def split_budget(shapes: Mapping[str, Sequence[int] | int], num_params: int | None = None,
                 density: float | None = None) -> dict[str, int]:
    """Split a model-level budget over weights in proportion to their size.

    ``shapes`` maps a name to a weight shape (or an element count). Give exactly one
    of ``num_params`` or ``density``; the result sums exactly to ``num_params`` (or
    ``round(density * total)``), using largest remainders, and no weight gets more
    than it has elements.
    """
    if (num_params is None) == (density is None):
        raise ApetValueError("split_budget needs exactly one of num_params or density")
    if not isinstance(shapes, Mapping):
        raise ApetValueError(f"shapes must map names to weight shapes or element counts, got {type(shapes).__name__}")
    for name, shape in shapes.items():
        if not (is_int(shape) and shape >= 0 or isinstance(shape, Sequence) and not isinstance(shape, str) and
                len(shape) == 2 and all(is_int(d) and d >= 0 for d in shape)):
            raise ApetValueError(f"shapes[{name!r}] must be a 2-D weight shape (out, in) or an element count, got "
                                 f"{shape!r}")
    sizes = {name: (int(s) if is_int(s) else math.prod(int(d) for d in s)) for name, s in shapes.items()}
    total = sum(sizes.values())
    if density is not None:
        if not is_real(density) or not 0.0 <= float(density) <= 1.0:
            raise ApetValueError(f"density must be a number in [0, 1], got {density!r}")
        num_params = round(float(density) * total)
    if not is_int(num_params) or num_params < 0:
        raise ApetValueError(f"num_params must be a non-negative int, got {num_params!r}")
    if num_params > total:
        raise ApetValueError(f"num_params={num_params} exceeds the {total} elements of the target weights")
    if total == 0:
        return {name: 0 for name in sizes}
    exact = {name: num_params * n / total for name, n in sizes.items()}
    budget = {name: math.floor(q) for name, q in exact.items()}
    left = num_params - sum(budget.values())
    # largest remainder first; ties broken by name so the split is deterministic
    order = sorted(sizes, key=lambda n: (-(exact[n] - budget[n]), n))
    for name in order:
        if left == 0:
            break
        if budget[name] < sizes[name]:
            budget[name] += 1
            left -= 1
    return budget


# ----------------------------------------------------------------------------- streamed top-k
def block_rows(out_features: int, in_features: int) -> int:
    """Rows per block: at most out/8 and at most 2**24 elements (64 MB of fp32)."""
    return max(1, min(max(1, out_features // 8), 2**24 // max(1, in_features)))


def merge_top(best_score, best_flat, score, flat, k: int, largest: bool):
    """The k best of two candidate sets; ties go to the lower flat index (deterministic)."""
    score = torch.cat([best_score, score])
    flat = torch.cat([best_flat, flat])
    order = torch.sort(flat, stable=True).indices
    score, flat = score[order], flat[order]
    keep = torch.sort(score, descending=largest, stable=True).indices[:k]
    return score[keep], flat[keep]


def top_of_blocks(blocks: Iterable[tuple[int, torch.Tensor]], in_features: int, k: int, largest: bool,
                   exclude: torch.Tensor | None = None):
    """Running top-k over (first_row, block scores (rows, in)) pairs: (scores, flat indices)."""
    best_score = torch.empty(0)
    best_flat = torch.empty(0, dtype=torch.int64)
    for r0, block in blocks:
        flat_block = block.reshape(-1)
        base = r0 * in_features
        n_ex, ex = 0, None
        if exclude is not None and exclude.numel():  # take as many more, then drop them: no copy of the block
            ex = exclude.long().to(flat_block.device)
            ex = ex[(ex >= base) & (ex < base + flat_block.numel())] - base
            n_ex = ex.numel()
        if best_score.numel() == k and k:
            # only entries strictly better than the k-th best so far can enter (a later block loses
            # ties): one pass over the block instead of a top-k of it, which cost as much as its GEMM
            worst = best_score.min() if largest else best_score.max()
            pos = torch.nonzero(flat_block > worst if largest else flat_block < worst).squeeze(1)
            score = flat_block[pos]
        else:
            n = min(k + n_ex, flat_block.numel())
            score, pos = torch.topk(flat_block, n, largest=largest, sorted=False)
        if n_ex:
            keep = ~torch.isin(pos, ex)
            score, pos = score[keep], pos[keep]
        best_score, best_flat = merge_top(best_score.to(score.device), best_flat.to(score.device), score,
                                           pos + base, k, largest)
    return best_score, best_flat


def _described(weight) -> str:
    """A weight argument in an error message: its shape and dtype, or its type when it is not a tensor."""
    return f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__


def magnitude_indices(weight_oi: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k entries of smallest |W| of an (out, in) weight (any strides). A weight holding
    NaN is refused (NaN would sort as neither small nor large)."""
    if not isinstance(weight_oi, torch.Tensor) or weight_oi.dim() != 2 or not weight_oi.is_floating_point():
        raise ApetValueError(f"magnitude_indices takes a 2-D float (out, in) weight, got {_described(weight_oi)}")
    out_f, in_f = weight_oi.shape
    if not is_int(k) or k < 0 or k > out_f * in_f:
        raise ApetValueError(f"k must be an int in [0, {out_f * in_f}] for a weight of shape {(out_f, in_f)}, got {k!r}")
    rows = block_rows(out_f, in_f)
    w = weight_oi.detach()

    def blocks():  # one row block at a time: never a tensor the size of W
        for r0 in range(0, out_f, rows):
            block = w[r0:r0 + rows].abs().float()
            if not block.is_meta and torch.isnan(block).any():
                raise ApetValueError("the weight holds NaN: magnitude positions cannot be chosen from it")
            yield r0, block
    _, flat = top_of_blocks(blocks(), in_f, k, largest=False)
    return torch.sort(flat).values.to(index_dtype(out_f * in_f)).cpu()
