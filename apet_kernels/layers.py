"""Drop-in modules: SparseDeltaLinear (sparse APET) and DenseMaskLinear (the dense-mask baseline)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._checks import check_index_content, check_index_meta
from .functional import sparse_delta_linear
from .ops.dispatch import CHOICES, resolve
from .ops.layout import build_layout
from .selection import select_indices

STRATEGIES = ("auto", "merged", "unmerged")


def _count_optimizer_steps(optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: count steps on every delta_values tensor.

    The merged strategy re-scatters W[p] = base + v when the values changed. In-place edits
    bump a tensor's version counter, but fused optimizers (e.g. AdamW(fused=True), the
    Trainer's default) write parameters without bumping it; this counter catches those.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(p, "_apet_steps"):
                p._apet_steps += 1


register_optimizer_step_post_hook(_count_optimizer_steps)


def _budget(numel: int, k: int | None, density: float | None) -> int:
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k or density")
    if k is None:
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density}")
        k = round(density * numel)
    return k


def merge_is_legal(weight: torch.Tensor) -> tuple[bool, str]:
    """Merged writes W's storage: not for quantized, sharded or explicitly shared weights."""
    if not weight.is_floating_point():
        return False, f"weight dtype {weight.dtype} is not floating point (quantized?)"
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        return False, "weight is sharded (DTensor)"
    if getattr(weight, "_apet_shared", False):
        return False, "weight is shared with another module (tied)"
    return True, ""


class SparseDeltaLinear(nn.Module):
    """``nn.Linear`` with K tunable scalars at arbitrary positions of its frozen weight.

    ``weight`` and ``bias`` are the wrapped layer's own parameters (not copies), frozen.
    ``delta_values`` (fp32, zeros at start) is the only trainable tensor; ``delta_indices``
    (sorted flat row-major positions) and ``delta_base`` (W's original values there) are
    persistent buffers.

    Strategies (DESIGN.md): ``merged`` keeps W + S written into W's storage, re-scattered
    only when the values changed, so the forward is a plain linear; ``unmerged`` never
    writes W and adds the sparse term with a kernel. ``auto`` picks merged where legal.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, indices: torch.Tensor, *,
                 strategy: str = "auto", backend: str = "auto", weight_transposed: bool = False):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        if backend not in CHOICES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # GPT-2's Conv1D keeps W as (in, out); we work on the (out, in) view, never a copy
        self.weight_transposed = weight_transposed
        self.out_features, self.in_features = self._weight_oi().shape
        self.backend = backend
        numel = self.out_features * self.in_features
        check_index_meta(indices, numel)
        check_index_content(indices, numel)
        indices = indices.to(self.weight.device)
        self.register_buffer("delta_indices", indices.clone())
        self.register_buffer("delta_base", self._gather_weight(indices))
        self.delta_values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32,
                                                     device=self.weight.device))
        self.delta_values._apet_steps = 0
        self._rebuild_layout()
        legal, why = merge_is_legal(self.weight)
        if strategy == "merged" and not legal:
            raise ValueError(f"strategy 'merged' is not legal here: {why}")
        self.strategy = "merged" if strategy == "auto" and legal else ("unmerged" if strategy == "auto" else strategy)
        self._merged_version: tuple | None = None  # values' change stamp last scattered; None = W pure
        self.apet_disabled = False  # True: behave as the wrapped layer (see ApetModel.disable_apet)
        self._register_load_state_dict_pre_hook(self._before_load)
        self.register_load_state_dict_post_hook(SparseDeltaLinear._after_load)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Module, k: int | None = None, density: float | None = None,
                    method: str = "random", seed: int = 0, key: str | None = None,
                    strategy: str = "auto", backend: str = "auto",
                    indices: torch.Tensor | None = None) -> "SparseDeltaLinear":
        """Wrap ``linear`` (``nn.Linear``, or GPT-2 ``Conv1D``), reusing its parameters.

        Positions come from ``select_indices(..., method, seed, key)`` with ``k`` or
        ``density``, or are given directly as ``indices``.
        """
        transposed = type(linear).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D
        weight = linear.weight
        shape = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
        if indices is None:
            k = _budget(shape[0] * shape[1], k, density)
            indices = select_indices(shape, k, method=method, seed=seed, key=key or "")
        elif k is not None or density is not None:
            raise ValueError("give either indices or a budget (k / density), not both")
        return cls(weight, linear.bias, indices, strategy=strategy, backend=backend,
                   weight_transposed=transposed)

    def _weight_oi(self) -> torch.Tensor:
        return self.weight.t() if self.weight_transposed else self.weight

    def _gather_weight(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.long()
        w = self._weight_oi().detach()
        return w[idx // self.in_features, idx % self.in_features].clone()

    def _rebuild_layout(self) -> None:
        """Orderings the kernels walk, derived from the indices (non-persistent). The column order
        (4 bytes per delta) is only needed by the unmerged backward, so it is built on first use."""
        layout = build_layout(self.delta_indices, (self.out_features, self.in_features), columns=False)
        self.register_buffer("_row_ptr", layout.row_ptr, persistent=False)
        self.register_buffer("_col_ptr", None, persistent=False)
        self.register_buffer("_col_perm", None, persistent=False)

    @property
    def layout(self):
        if self.strategy != "merged" and self._col_perm is None:
            full = build_layout(self.delta_indices, (self.out_features, self.in_features))
            self._col_ptr, self._col_perm = full.col_ptr, full.col_perm
        return (self._row_ptr, self._col_ptr, self._col_perm)

    # ----------------------------------------------------------------- merge state
    @property
    def merged(self) -> bool:
        """True while W's storage holds W + S."""
        return self._merged_version is not None

    def _backend_name(self) -> str:
        return resolve(self.backend, self.weight.device)

    @torch.no_grad()
    def _scatter(self, values: torch.Tensor) -> None:
        torch.ops.apet.scatter_merge_(self._weight_oi(), self.delta_indices, self.delta_base,
                                      values, self._backend_name())

    def _values_stamp(self) -> tuple:
        """Changes whenever delta_values may have: in-place edits and optimizer steps."""
        return self.delta_values._version, getattr(self.delta_values, "_apet_steps", 0)

    @torch.compiler.disable
    def _sync_merged(self) -> None:
        """Re-scatter W[p] = base + v if the values changed since the last write (K writes)."""
        if self._merged_version != self._values_stamp():
            self._scatter(self.delta_values)
            self._merged_version = self._values_stamp()

    def merge(self) -> None:
        """Switch to the merged strategy: write W + S into W's storage and keep it in sync."""
        legal, why = merge_is_legal(self.weight)
        if not legal:
            raise RuntimeError(f"cannot merge: {why}")
        self.strategy = "merged"
        self._sync_merged()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W bit-exactly from ``delta_base`` and switch to the unmerged strategy."""
        self._restore_base()
        self.strategy = "unmerged"

    @torch.no_grad()
    def _restore_base(self) -> None:
        if self.merged:
            self._scatter(torch.zeros_like(self.delta_values))
            self._merged_version = None

    def delta_weight(self) -> torch.Tensor:
        """Dense fp32 Delta W (out, in). For inspection and merging only: allocates out x in."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32,
                            device=self.delta_values.device)
        dense.view(-1)[self.delta_indices.long()] = self.delta_values.detach().float()
        return dense

    # ----------------------------------------------------------------- state dict
    def _before_load(self, state_dict, prefix, *args, **kwargs):
        # check before anything is copied, so a bad file leaves the module untouched
        numel = self.out_features * self.in_features
        incoming = state_dict.get(prefix + "delta_indices")
        if incoming is not None:
            check_index_meta(incoming, numel)
            if incoming.shape != self.delta_indices.shape:
                raise ValueError(f"{prefix}delta_indices has {incoming.numel()} entries, this layer has "
                                 f"{self.delta_indices.numel()}")
            check_index_content(incoming, numel)
        # the incoming weight (if any) may be merged at other positions; start from pure W
        self._restore_base()

    @staticmethod
    @torch.no_grad()
    def _after_load(module: "SparseDeltaLinear", incompatible_keys) -> None:
        # a saved weight may hold W + S; delta_base always holds W at the positions
        module._scatter(torch.zeros_like(module.delta_values))
        module._merged_version = None
        module._rebuild_layout()

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apet_disabled:
            self._restore_base()  # the next enabled merged forward re-scatters
            return F.linear(x, self._weight_oi(), self.bias)
        merged = self.strategy == "merged"
        if merged:
            self._sync_merged()
        return sparse_delta_linear(x, self._weight_oi(), self.bias, self.delta_values, self.delta_indices,
                                   backend=self.backend, weight_is_merged=merged, layout=self.layout,
                                   validate=False)

    def extra_repr(self) -> str:
        k, numel = self.delta_indices.numel(), self.out_features * self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, k={k} ({100.0 * k / numel:.3g}%), "
                f"strategy={self.strategy}, backend={self.backend}"
                + (", weight_transposed=True" if self.weight_transposed else ""))


class DenseMaskLinear(nn.Module):
    """Dense-mask APET (the baseline): a full-size fp32 delta and a full-size bool mask.

    forward: y = x (W + M * Delta)^T + b, with W + M * Delta rounded to W's dtype (what
    dense-mask APET in bf16 does). Costs about 17 bytes per weight element under Adam,
    whatever K is: this is what SparseDeltaLinear avoids.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, indices: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        check_index_meta(indices, weight.numel())
        check_index_content(indices, weight.numel())
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        mask.view(-1)[indices.long().to(weight.device)] = True
        self.register_buffer("mask", mask)
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor) -> "DenseMaskLinear":
        return cls(linear.weight, linear.bias, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_eff = (self.weight.float() + self.delta * self.mask).to(self.weight.dtype)
        return F.linear(x, w_eff, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, k={int(self.mask.sum())}"
