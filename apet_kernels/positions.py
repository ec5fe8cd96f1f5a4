"""Learned positions without dense masks: largest accumulated gradient, drop-and-regrow (the smallest
|W|, data-free, is ``selection.magnitude_indices``).

Memory never grows with out x in beyond one row block:

- ``GradientScores``: the K entries with the largest gradient magnitude accumulated over a few
  batches. A batch's dense gradient dW = dy^T x is formed one row block at a time (block x in) and
  only its top-(c K) entries are kept. A per-layer candidate pool of c K positions carries exact
  accumulated scores: each batch adds |dW| at the pool's positions (an SDDMM, no dense dW) and offers
  the batch's top-(c K) as newcomers, which enter with their score of that batch only (so a
  position that first enters late misses its earlier batches). A second pass over the same batches
  then accumulates the pool's exact scores (SDDMM only) and the top-K is taken from those: the one
  approximation left is a true top-K position that never made it into the pool (tested against the
  exact dense top-K: >= 90% overlap).
- ``Regrower``: every ``interval`` steps, drop the fraction rho of each layer's deltas with the
  smallest |value| and regrow as many at the untuned positions with the largest gradient magnitude
  of that step (SpIEL-AG's idea, mask-free), rho decaying to 0. Values and optimizer state move with
  their positions; new entries start at zero with zeroed moments.

Row blocks hold at most ``max(1, min(out // 8, 2**24 // in))`` rows (<= 64 MB of fp32).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .errors import ApetTypeError, ApetValueError
from .layer import SparseDeltaLinear
from .linear_like import linear_shape, weight_oi
from .ops.dispatch import implementation, resolve
from .ops.layout import build_layout
from .selection import block_rows, index_dtype, top_of_blocks
from .sharded import assign_full, full_tensor, is_dtensor

SCORES = ("abs", "squared")  # |g| or g^2 (a diagonal Fisher estimate) accumulated over batches
# calibration (GradientScores) also ranks by |sum of g| ("signed": what the optimizer's first steps see; noise
# that cancels over batches does not count), by |w| * sum |g| ("snip", SNIP's saliency |w g|) or by sum of
# |g_ij| / ||x_j|| ("xnorm": each batch's |g| divided by its input feature's norm over the batch's tokens).
# |g_ij| = |sum_t dy_ti x_tj| grows with ||x_j||, so plain |g| piles positions onto the few features with large
# activations, where Adam's ~lr step per scalar moves the output most (python/adam_travel.py measured 2x);
# xnorm ranks by how well the feature and the output's gradient align instead. "corr" also divides by the output's
# gradient norm ||dy_i||: |g_ij| / (||dy_i|| ||x_j||) is the |cosine| between the two over the batch's tokens, blind
# to the scale of rows as well as columns.
CALIBRATION_SCORES = SCORES + ("signed", "snip", "xnorm", "corr")


def _inverse_norms(t: torch.Tensor) -> torch.Tensor:
    """1 / the norm of each column of t (fp32); a column that is zero on every token gives a zero gradient too
    and scores 0."""
    norm = t.float().norm(dim=0)
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


def _scales(dy: torch.Tensor, x: torch.Tensor, score: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per output row, per input column) factors of one batch's |g|: 1 / ||x_j|| for "xnorm" and "corr",
    1 / ||dy_i|| for "corr"; None where the score has none."""
    row = _inverse_norms(dy) if score == "corr" else None
    col = _inverse_norms(x) if score in ("xnorm", "corr") else None
    return row, col


def _dense_grad_blocks(dy: torch.Tensor, x: torch.Tensor, out_f: int, score: str, weight: torch.Tensor | None = None):
    """(first row, |dW| or dW^2 of rows r0..r0+rows) for dW = dy^T x, one row block at a time, fp32; times |W|
    of those rows when ``weight`` (out, in) is given; divided by the input features' norms for "xnorm" (and the
    output gradients' norms for "corr")."""
    rows = block_rows(out_f, x.shape[1])
    xf = x.float()
    row_scale, col_scale = _scales(dy, x, score)
    for r0 in range(0, out_f, rows):
        g = dy[:, r0:r0 + rows].float().t() @ xf
        g = g.square_() if score == "squared" else g.abs_()
        if weight is not None:
            g.mul_(weight[r0:r0 + rows].to(g.device).float().abs())
        if col_scale is not None:
            g.mul_(col_scale)
        if row_scale is not None:
            g.mul_(row_scale[r0:r0 + rows, None])
        yield r0, g


def _contribution(g: torch.Tensor, score: str) -> torch.Tensor:
    """What one batch adds to a position's accumulator: |g| (also for "snip", "xnorm" and "corr", weighted after), g^2,
    or g itself ("signed": the step's summed gradient, ranked by its magnitude, as the optimizer sees it)."""
    return g if score == "signed" else (g.square() if score == "squared" else g.abs())


def _rank(acc: torch.Tensor, score: str) -> torch.Tensor:
    return acc.abs() if score == "signed" else acc


class _PoolState:
    """One layer's candidate pool: flat positions and their accumulated scores. ``exclude`` (sorted
    flat positions) never enter it: the regrower's currently tuned positions."""

    def __init__(self, shape: tuple[int, int], k: int, pool_factor: float, exclude: torch.Tensor | None = None,
                 weight: Callable[[], torch.Tensor] | None = None):
        self.shape, self.k, self.exclude = shape, k, exclude
        self.weight = weight  # score "snip": the layer's weight (out, in), each contribution times |w|
        self.size = min(shape[0] * shape[1], max(k, math.ceil(pool_factor * k)))
        self.flat = torch.empty(0, dtype=torch.int64)
        self.acc = torch.empty(0)

    def _sddmm(self, dy: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, backend: str) -> torch.Tensor:
        """The batch's gradient dW at ``flat`` (any order), by an SDDMM over them sorted: no dense dW."""
        out_f, in_f = self.shape
        order = torch.sort(flat).indices
        idx = flat[order].to(x.device).to(index_dtype(out_f * in_f))
        layout = build_layout(idx, self.shape, columns=False)
        g = implementation(resolve(backend, x.device)).sddmm(dy, x, idx, layout.row_ptr).float()
        return torch.empty_like(g).index_copy_(0, order.to(g.device), g)

    def _scored(self, dy: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, score: str, backend: str) -> torch.Tensor:
        """One batch's contribution at ``flat``: |g|, g^2 or g (SDDMM), times |w| for "snip", divided by the input
        feature's norm for "xnorm" (and the output gradient's for "corr")."""
        c = _contribution(self._sddmm(dy, x, flat, backend), score)
        in_f = self.shape[1]
        if score == "snip":
            w = self.weight()
            f = flat.to(w.device).long()
            c = c * w[f // in_f, f % in_f].to(c.device).float().abs()
        row_scale, col_scale = _scales(dy, x, score)
        if col_scale is not None:
            c = c * col_scale[flat.to(col_scale.device).long() % in_f].to(c.device)
        if row_scale is not None:
            c = c * row_scale[flat.to(row_scale.device).long() // in_f].to(c.device)
        return c

    def add_batch(self, dy: torch.Tensor, x: torch.Tensor, score: str, backend: str) -> None:
        out_f, in_f = self.shape
        dy, x = dy.reshape(-1, out_f), x.reshape(-1, in_f)
        if self.flat.numel():  # exact increments at the pool's positions
            self.acc = self.acc.to(x.device) + self._scored(dy, x, self.flat, score, backend)
        weight = self.weight() if score == "snip" else None
        cand_score, cand_flat = top_of_blocks(_dense_grad_blocks(dy, x, out_f, score, weight),
                                              in_f, self.size, largest=True, exclude=self.exclude)
        if self.flat.numel():  # newcomers enter with this batch's contribution; members keep theirs
            new = ~torch.isin(cand_flat, self.flat.to(cand_flat.device))
            cand_score, cand_flat = cand_score[new], cand_flat[new]
        if score == "signed" and cand_flat.numel():
            cand_score = self._sddmm(dy, x, cand_flat, backend)
        flat = torch.cat([self.flat.to(cand_flat.device), cand_flat])
        acc = torch.cat([self.acc.to(cand_score.device), cand_score.float()])
        order = torch.sort(flat, stable=True).indices  # ties go to the lower position (deterministic)
        flat, acc = flat[order], acc[order]
        keep = torch.sort(_rank(acc, score), descending=True, stable=True).indices[:self.size]
        self.flat, self.acc = flat[keep], acc[keep]

    def rescore_batch(self, dy: torch.Tensor, x: torch.Tensor, score: str, backend: str) -> None:
        """Second pass: exact accumulated scores of the pool's positions only (an SDDMM per batch)."""
        out_f, in_f = self.shape
        dy, x = dy.reshape(-1, out_f), x.reshape(-1, in_f)
        if not hasattr(self, "exact"):
            self.exact = torch.zeros(self.flat.numel(), device=x.device)
        self.exact += self._scored(dy, x, self.flat, score, backend)

    def finish_rescoring(self) -> None:
        if hasattr(self, "exact"):
            self.acc = self.exact
            del self.exact

    def all_reduce(self, group=None) -> None:
        """Every rank's candidates, with their accumulated signed sums added up over the ranks (a rank that did not
        keep a candidate contributes zero there, the pool's one approximation): the same pool on every rank."""
        import torch.distributed as dist
        device = self.acc.device
        flat = self.flat.to(device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([flat.numel()], device=device), group=group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
        padded[:flat.numel()] = flat
        everyone = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(everyone, padded, group=group)
        union = torch.unique(torch.cat(everyone))
        union = union[union >= 0]
        acc = torch.zeros(union.numel(), dtype=torch.float32, device=device)
        acc[torch.searchsorted(union, flat)] = self.acc.float()
        dist.all_reduce(acc, group=group)
        self.flat, self.acc = union, acc

    def best(self, score: str = "abs", row_cap: float | None = None, col_cap: float | None = None) -> torch.Tensor:
        """The top-K of the pool by score. With ``row_cap`` a row takes at most ceil(row_cap * K / out) of them,
        with ``col_cap`` a column at most ceil(col_cap * K / in) (columns first, then rows among what is left),
        while other candidates remain; the rest of K is then filled in score order, so K is always met."""
        out_f, in_f = self.shape
        ranked = _rank(self.acc, score).float()
        order = torch.sort(ranked, descending=True, stable=True).indices
        if self.k and (row_cap is not None or col_cap is not None):
            flat = self.flat.to(order.device)[order]
            within = torch.ones_like(order, dtype=torch.bool)
            for cap, groups, n in ((col_cap, flat % in_f, in_f), (row_cap, flat // in_f, out_f)):
                if cap is not None:
                    within[within.clone()] = _first_per_group(groups[within], math.ceil(cap * self.k / n))
            order = torch.cat([order[within], order[~within]])           # capped picks first, overflow after
        keep = order[:self.k]
        return torch.sort(self.flat[keep]).values.to(index_dtype(out_f * in_f)).cpu()


def _first_per_group(groups: torch.Tensor, cap: int) -> torch.Tensor:
    """For entries in priority order: whether each is among the first ``cap`` of its group."""
    by_group = torch.sort(groups, stable=True)                       # grouped, priority order kept within
    first = torch.searchsorted(by_group.values, by_group.values)
    rank = torch.empty_like(groups)
    rank[by_group.indices] = torch.arange(groups.numel(), device=groups.device) - first
    return rank < cap


@contextlib.contextmanager
def _observe(model: nn.Module, modules: dict[str, nn.Module], on_grad: Callable[[str, torch.Tensor, torch.Tensor],
                                                                                  None]):
    """While active, each module's backward calls on_grad(name, dy, x). The model's input embeddings
    are made to require grad, so the backward reaches every layer although all weights are frozen
    (and autograd never forms a weight gradient)."""
    handles = []

    def forward_hook(name):
        def hook(module, args, output):
            x = args[0].detach()
            if output.requires_grad:  # (each call's own x: a module called twice gets both)
                output.register_hook(lambda dy: on_grad(name, dy.detach(), x))
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(
            lambda m, a, out: out if out.requires_grad else out.detach().requires_grad_()))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _loss(model: nn.Module, batch, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    out = model(**batch) if isinstance(batch, Mapping) else model(*batch)  # (BatchEncoding is a Mapping)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ApetValueError("the model returned no .loss for a calibration batch: include labels, or pass loss_fn")
    return loss


class GradientScores:
    """Accumulated gradient magnitudes of the target layers' weights over calibration batches, kept
    per layer as a candidate pool of ``pool_factor`` x K positions (see the module docstring)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], budget: dict[str, int],
                 score: str = "abs", pool_factor: float = 4.0, backend: str = "auto", row_cap: float | None = None,
                 weight_of: Callable[[nn.Module], torch.Tensor] | None = None, col_cap: float | None = None):
        if score not in CALIBRATION_SCORES:
            raise ApetValueError(f"unknown gradient score {score!r}; choose one of {CALIBRATION_SCORES}")
        for name, cap in (("row_cap", row_cap), ("col_cap", col_cap)):
            if cap is not None and not cap > 0:
                raise ApetValueError(f"{name} must be positive (a multiple of K / out or K / in), got {cap}")
        self.model, self.targets, self.score, self.backend = model, targets, score, backend
        self.row_cap, self.col_cap = row_cap, col_cap
        weight_of = weight_of or (lambda m: weight_oi(m).detach())
        self.pools = {name: _PoolState(linear_shape(m), budget[name], pool_factor,
                                       weight=(lambda m=m: weight_of(m)) if score == "snip" else None)
                      for name, m in targets.items()}

    def _on_grad(self, name: str, dy: torch.Tensor, x: torch.Tensor) -> None:
        self.pools[name].add_batch(dy, x, self.score, self.backend)

    def accumulate(self, batches: Iterable, loss_fn: Callable | None = None, rescore: bool = True) -> int:
        """Run forward and backward on each batch; no parameter gets a gradient (all are frozen for the
        duration and restored after). With ``rescore`` a second pass over the same batches gives the
        pool's positions their exact accumulated scores, so the final top-K is exact within the pool
        (measured on a tiny LLaMA, 4 batches, pool 4K: 79% overlap with the dense top-K in one pass).
        Returns the batch count."""
        batches = list(batches)
        if not batches:
            raise ApetValueError("no calibration batches were given")
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with _observe(self.model, self.targets, self._on_grad):
                for batch in batches:
                    _loss(self.model, batch, loss_fn).backward()
            if rescore:
                with _observe(self.model, self.targets, self._on_rescore):
                    for batch in batches:
                        _loss(self.model, batch, loss_fn).backward()
                for pool in self.pools.values():
                    pool.finish_rescoring()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return len(batches)

    def _on_rescore(self, name: str, dy: torch.Tensor, x: torch.Tensor) -> None:
        self.pools[name].rescore_batch(dy, x, self.score, self.backend)

    def indices(self) -> dict[str, torch.Tensor]:
        return {name: pool.best(self.score, self.row_cap, self.col_cap) for name, pool in self.pools.items()}


# ----------------------------------------------------------------------------- drop and regrow
def regrow_fraction(step: int, total_steps: int, fraction: float, schedule: str) -> float:
    """rho at ``step``: ``fraction`` decaying to 0 at ``total_steps``, linearly or along a half cosine."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    if schedule == "linear":
        return fraction * (1.0 - progress)
    if schedule == "cosine":
        return fraction * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ApetValueError(f"unknown schedule {schedule!r}; choose linear or cosine")


# optimizer state that is not one entry per value (bitsandbytes: quantization maps, block scales, norms)
_NOT_PER_ENTRY = {"qmap1", "qmap2", "absmax1", "absmax2", "gnorm_vec", "unorm_vec"}


def _bnb_blockwise(state: dict, key: str) -> bool:
    """A bitsandbytes 8-bit optimizer's state1/state2: uint8 codes of a quantization map, per-block scales."""
    suffix = key[-1:]
    return key in ("state1", "state2") and state[key].dtype == torch.uint8 and f"qmap{suffix}" in state \
        and f"absmax{suffix}" in state


def _moved_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, moved, is_new: torch.Tensor):
    """Each per-entry state tensor of ``param``'s, moved with its positions (``moved``: kept entries in their new
    order, zeros for the new ones), as (tensor to write into, new content[, block scales to write into, new
    scales]). Computed before anything is written, so an optimizer whose state cannot move refuses whole."""
    state = optimizer.state.get(param) or {}
    k, plan = param.numel(), []
    for key, t in state.items():
        if not torch.is_tensor(t) or t.numel() != k or t.dim() != 1 or key in _NOT_PER_ENTRY:
            continue
        if _bnb_blockwise(state, key):  # dequantize, move, quantize again with fresh block scales
            import bitsandbytes.functional as bnbf
            code, absmax = state[f"qmap{key[-1]}"], state[f"absmax{key[-1]}"]
            blocksize = -(-k // absmax.numel())
            blocksize = 1 << (blocksize - 1).bit_length()  # (bitsandbytes' block sizes are powers of two)
            values = moved(bnbf.dequantize_blockwise(t, absmax=absmax, code=code, blocksize=blocksize))
            codes, quant = bnbf.quantize_blockwise(values, code=code, blocksize=blocksize)
            codes[is_new.to(codes.device)] = int(torch.argmin(code.abs()))  # new entries: exactly zero moments
            plan.append((t, codes, absmax, quant.absmax))
        elif type(t) is not torch.Tensor and not is_dtensor(t) and callable(getattr(t, "dequantize", None)):
            plan.append((t, moved(t.dequantize())))  # torchao's low-bit states: copy_ quantizes again
        elif t.is_floating_point() or t.is_complex():
            plan.append((t, moved(full_tensor(t))))  # (FSDP2 shards optimizer state with its parameter)
        else:
            raise ApetTypeError(f"cannot move {type(optimizer).__name__}'s state {key!r} ({type(t).__name__}, {t.dtype}) "
                                f"with its positions: regrowth supports torch's optimizers, bitsandbytes' 8-bit and paged "
                                f"ones and torchao's low-bit ones")
    return plan


def _move(layer, new_flat: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Drop as many of ``layer``'s deltas (smallest |value|) as ``new_flat`` has positions and tune those
    instead. Values and every per-entry optimizer state tensor move with their positions; the new
    entries start at zero with zero moments."""
    n = new_flat.numel()
    if n == 0:
        return
    values = full_tensor(layer.delta_values.detach())  # every rank moves the whole tensor the same way
    k = values.numel()
    order_by_size = torch.sort(values.abs().float().cpu(), stable=True).indices
    keep = torch.ones(k, dtype=torch.bool)
    keep[order_by_size[:n]] = False
    keep = keep.to(values.device)
    indices = torch.cat([layer.delta_indices.long()[keep], new_flat.to(values.device).long()])
    order = torch.sort(indices).indices
    is_new = order >= k - n  # (positions after the kept ones in the concatenation are the new ones)

    def moved(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[keep], torch.zeros(n, dtype=t.dtype, device=t.device)])[order]

    plan = _moved_optimizer_state(optimizer, layer.delta_values, moved, is_new) if optimizer is not None else []
    for target, content, *scales in plan:
        assign_full(target, content)
        if scales:
            scales[0].copy_(scales[1])
    layer.set_positions(indices[order].to(layer.delta_indices.dtype), moved(values))


def _data_parallel_group():
    """The default process group when several ranks train (DDP, FSDP2), else None."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class Regrower:
    """Drop-and-regrow for the SparseDeltaLinear layers of a model (plain training loops).

        regrower = Regrower(model, optimizer, interval=100, fraction=0.3, total_steps=len(loader))
        for batch in loader:
            with regrower.observe():          # gathers gradient scores on the steps before a regrowth
                model(**batch).loss.backward()
            optimizer.step()
            regrower.step()                   # every `interval` steps: move the weakest deltas
            optimizer.zero_grad()

    A regrowth at step t drops round(rho(t) * K) deltas of each layer (smallest |value|) and tunes the
    untuned positions where the observed step's gradient, summed over its micro-batches as the optimizer
    sees it, is largest in magnitude (``score`` "abs" and "squared" rank alike there) instead; rho decays from
    ``fraction`` to 0 over ``total_steps``. K stays fixed; indices stay sorted and unique; merged weights
    are restored at dropped positions and re-based at new ones, so unmerge stays bit-exact. Optimizer
    state moves with its positions (torch's optimizers, bitsandbytes' 8-bit and paged ones, torchao's
    low-bit ones); new entries start at zero moments (torchao's 4-bit second moment has no zero: at its
    smallest level, a few percent of its block's largest).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, interval: int,
                 total_steps: int, fraction: float = 0.2, schedule: str = "cosine", score: str = "abs",
                 pool_factor: float = 2.0):
        if interval < 1 or total_steps < 1 or not 0.0 <= fraction <= 1.0:
            raise ApetValueError("interval and total_steps must be >= 1 and fraction within [0, 1]")
        if score not in SCORES:
            raise ApetValueError(f"unknown gradient score {score!r}; choose one of {SCORES}")
        regrow_fraction(0, total_steps, fraction, schedule)  # checks the schedule's name
        self.model = model
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
        if not self.layers:
            raise ApetValueError("the model has no SparseDeltaLinear layers to regrow")
        self.optimizer, self.interval, self.total_steps = optimizer, interval, total_steps
        self.fraction, self.schedule, self.score, self.pool_factor = fraction, schedule, score, pool_factor
        self.steps = 0
        self.moved = 0  # deltas moved so far, all layers
        self._pools: dict[str, _PoolState] | None = None  # the gradients observed for the step now running
        self._pools_step = -1

    def due(self) -> bool:
        """Whether the step now running ends with a regrowth."""
        nxt = self.steps + 1
        return nxt % self.interval == 0 and nxt < self.total_steps and bool(self._counts(nxt))

    def _counts(self, step: int) -> dict[str, int]:
        rho = regrow_fraction(step, self.total_steps, self.fraction, self.schedule)
        counts = {name: min(round(rho * m.delta_values.numel()),
                            m.out_features * m.in_features - m.delta_values.numel())
                  for name, m in self.layers.items()}
        return {name: c for name, c in counts.items() if c > 0}

    @contextlib.contextmanager
    def observe(self):
        """Around the forward and backward of a step (or of each of its micro-batches under gradient
        accumulation: they add up): on a step that ends with a regrowth, gathers each layer's top untuned
        positions by gradient magnitude (row blocks, no out x in tensor)."""
        if not self.due():
            yield
            return
        if self._pools is None or self._pools_step != self.steps:  # the step's first micro-batch
            counts = self._counts(self.steps + 1)
            self._pools = {name: _PoolState((m.out_features, m.in_features), counts[name], self.pool_factor,
                                            exclude=m.delta_indices)
                           for name, m in self.layers.items() if name in counts}
            self._pools_step = self.steps
        watched = {name: self.layers[name] for name in self._pools}

        def on_grad(name, dy, x):  # the step's summed gradient, micro-batch by micro-batch
            self._pools[name].add_batch(dy, x, "signed", self.layers[name].backend)
        with _observe(self.model, watched, on_grad):
            yield

    @torch.no_grad()
    def step(self) -> int:
        """Call after optimizer.step(): counts the step and regrows if it was due. Returns the number
        of deltas moved."""
        self.steps += 1
        pools, self._pools = self._pools, None
        if not pools:
            return 0
        group = _data_parallel_group()
        moved = 0
        for name, pool in pools.items():  # (the same order on every rank: the collectives pair up)
            if group is not None:
                pool.all_reduce(group)  # under DDP / FSDP2: the step's gradient summed over the ranks
            if pool.flat.numel():
                new = pool.best("signed")
                _move(self.layers[name], new, self.optimizer)
                moved += new.numel()
        self.moved += moved
        return moved
