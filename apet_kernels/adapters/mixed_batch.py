"""Mixed-adapter batches: batch row i applies adapter ``names[i]`` (``"__base__"``: none), PEFT-style.

A layer sees its input as (rows, ..., in) or, where a model flattens tokens before a linear (Qwen2-MoE's
shared expert, ``view(-1, hidden)``), as (rows x seq, in). The model's forward pre-hook tells the plan
the batch's row count and sequence lengths, so each layer maps its inputs to rows by shape; inputs it
cannot map (routed experts that see a subset of tokens) are refused, never guessed.
"""

from __future__ import annotations

import math

import torch
from ..errors import ApetValueError

BASE = "__base__"
_BATCH_KEYS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


def batch_shape(args: tuple, kwargs: dict) -> tuple[int | None, set[int]]:
    """(rows, sequence lengths) of a model call, from its token inputs (None where there are none)."""
    found = [kwargs.get(k) for k in _BATCH_KEYS if torch.is_tensor(kwargs.get(k))]
    if not found and args and torch.is_tensor(args[0]):
        found = [args[0]]
    if not found:
        return None, set()
    return found[0].shape[0], {t.shape[1] for t in found if t.dim() >= 2}


class MixedBatch:
    """One mixed-adapter batch: the names per row and, per input shape a layer sees, which of its flattened
    inputs belong to which adapter. ``expand``: generate() may repeat each row (beams, several return
    sequences) the way transformers does, ``repeat_interleave`` along the batch."""

    def __init__(self, names: list[str], expand: bool = False):
        self.names = list(names)
        self.expand = expand
        self.row_names = self.names
        self.seqs: set[int] = set()
        self._groups: dict = {}

    def begin_forward(self, args: tuple, kwargs: dict) -> None:
        rows, seqs = batch_shape(args, kwargs)
        if rows is None:
            return
        n = len(self.names)
        if rows == n:
            row_names = self.names
        elif self.expand and rows % n == 0:
            row_names = [name for name in self.names for _ in range(rows // n)]
        else:
            raise ApetValueError(f"adapter_names has {n} names for a batch of {rows} rows: give one name per row "
                             f"('{BASE}' for the base model)")
        if row_names != self.row_names or seqs != self.seqs:
            self.row_names, self.seqs, self._groups = row_names, seqs, {}

    def token_groups(self, shape: tuple[int, ...], device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter, indices of its inputs among the flattened (..., in) input of this shape), adapters only."""
        key = (shape, device)
        groups = self._groups.get(key)
        if groups is None:
            groups = self._groups[key] = self._group(shape, device)
        return groups

    def _group(self, shape: tuple[int, ...], device: torch.device) -> list[tuple[str, torch.Tensor]]:
        rows, lead = len(self.row_names), shape[:-1]
        n_inputs = math.prod(lead)
        if lead and lead[0] == rows:
            per_row = n_inputs // rows  # (rows, seq, ...) or (rows,)
        elif len(lead) == 1 and rows and lead[0] % rows == 0 and lead[0] // rows in self.seqs:
            per_row = lead[0] // rows  # tokens flattened row-major: (rows x seq,)
        else:
            raise ApetValueError(f"a mixed-adapter batch of {rows} rows cannot tell which row each input of a layer "
                             f"called with shape {tuple(shape)} belongs to (a layer that sees routed or regrouped "
                             f"tokens, such as a mixture-of-experts expert?): exclude it from the adapters or run "
                             f"one adapter per batch")
        row_of = torch.arange(rows).repeat_interleave(per_row)
        order = {name: i for i, name in enumerate(dict.fromkeys(self.row_names))}
        adapter_of_row = torch.tensor([order[name] for name in self.row_names])
        adapter_of = adapter_of_row[row_of]
        return [(name, torch.nonzero(adapter_of == i).squeeze(1).to(device))
                for name, i in order.items() if name != BASE]
