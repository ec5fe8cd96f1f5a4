"""How a SparseDeltaLinear's adapters are read: the active one (``active_adapter``, its ``delta_values`` /
``delta_indices`` / ``delta_base``), the others, and each as a dense matrix for inspection. A mixin of the layer
(PEFT's layers split the same way: ``LoraLayer`` holds the adapters, ``lora.Linear`` computes)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_index_content, check_index_meta
from ..errors import ApetStateError, ApetTypeError, ApetValueError
from ..sharded import assign_full
from ..ops.layout import DeltaLayout
from ..selection import index_dtype


class AdapterAccess:
    """The adapter accessors of SparseDeltaLinear (``deltas``: adapter name -> DeltaSet; ``_active_adapter``: the
    active adapter first, then others applied with it)."""

    @property
    def active_adapter(self) -> str:
        """The adapter trained (and applied)."""
        if not self._active_adapter:
            raise ApetStateError("this layer has no adapter (the last one was deleted): add one and set_adapter() it")
        return self._active_adapter[0]

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter, then others applied with it (unmerged)."""
        return list(self._active_adapter)

    def _set_active_cache(self) -> None:
        # a plain attribute (not a registered submodule): the forward reads it without nn.Module lookups
        self.__dict__["_active"] = self.deltas[self.active_adapter]

    @property
    def delta_values(self) -> nn.Parameter:
        return self._active.values

    @delta_values.setter
    def delta_values(self, value: nn.Parameter) -> None:
        if not isinstance(value, nn.Parameter) or tuple(value.shape) != (self._active.k,):
            raise ApetTypeError(f"delta_values must be an nn.Parameter of shape ({self._active.k},)")
        self._active.values = value

    def __setattr__(self, name, value):
        if name == "delta_values":  # (nn.Module would register a Parameter under that name instead)
            type(self).delta_values.fset(self, value)
        else:
            super().__setattr__(name, value)

    @property
    def delta_indices(self) -> torch.Tensor:
        return self._active.indices

    @property
    def delta_base(self) -> torch.Tensor:
        """W's own values at the active adapter's positions (its ``base`` buffer)."""
        return self._active.base

    @property
    def layout(self) -> DeltaLayout:
        return self._active.layout

    @property
    def index_device(self) -> torch.device:
        """Where this layer's positions live (the weight's device; a layer may hold no adapter)."""
        first = next(iter(self.deltas.values()), None)
        return first.indices.device if first is not None else self.weight.device

    def empty_indices(self) -> torch.Tensor:
        """K = 0 positions of this layer's index dtype (an adapter that tunes nothing here)."""
        return torch.empty(0, dtype=index_dtype(self.out_features * self.in_features))

    @property
    def adapters(self) -> list[str]:
        return list(self.deltas.keys())

    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """Dense fp32 Delta W (out, in) of ``adapter`` (default: the active one). For inspection and merging
        only: allocates out x in."""
        delta = self.deltas[adapter] if adapter is not None else self._active
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=delta.values.device)
        dense.view(-1)[delta.indices.long()] = delta.values.detach().float()
        return dense

    def _checked_indices(self, indices: torch.Tensor, what: str) -> None:
        numel = self.out_features * self.in_features
        try:
            check_index_meta(indices, numel)
            check_index_content(indices, numel)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}: {exc}") from None

    @torch.no_grad()
    def set_positions(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Tune K other positions (K unchanged) in the active adapter: W is restored at the old positions, the
        base read at the new ones, and ``values`` (default: zeros) written in place into ``delta_values``
        so an optimizer keeps its reference. Used by drop-and-regrow (apet_kernels.positions.Regrower)."""
        k = self.delta_indices.numel()
        check_index_meta(indices, self.out_features * self.in_features)
        if indices.numel() != k:
            raise ApetValueError(f"set_positions keeps K fixed: got {indices.numel()} positions, the layer has {k}")
        self._checked_indices(indices, "set_positions")
        if values is not None and tuple(values.shape) != (k,):
            raise ApetValueError(f"values must have shape ({k},), got {tuple(values.shape)}")
        with self._strategy.changing(self):
            self.delta_indices.copy_(indices.to(self.delta_indices.device, self.delta_indices.dtype))
            self._weight.reread_base()
            self._active.rebuild_layout()
            assign_full(self.delta_values, torch.zeros(k) if values is None else values)  # (FSDP2: each rank its own)
