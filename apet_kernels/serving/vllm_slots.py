"""What a vLLM LoRA layer holds of the APET adapters in its slots, and the term they add to its output. Two ways,
one result (tests/test_vllm_serving.py runs both):

- per slot (the CPU): each slot's deltas kept apart; the library's SpMM runs once per slot present in the batch on
  that slot's tokens (index_select / index_copy), and a batch of base and APET requests only skips vLLM's own LoRA
  term (those slots' LoRA weights are zero). Host syncs decide which slots are present: right eagerly.
- one table (a GPU, or APET_BACKEND=triton): every slot's deltas stacked in a SlotTable of fixed capacity
  (``max_lora_rank x (in + out)`` entries a slot: the parameter count of a LoRA adapter vLLM accepts), written in
  place as adapters come and go, and applied by one slot_spmm_ launch that reads each token's slot on the device:
  no host sync and fixed addresses, as a CUDA graph needs.
"""

from __future__ import annotations

import os

import torch

from ..ops.dispatch import implementation, resolve
from ..ops.layout import build_layout, stack_slots


class ModuleDeltas:
    """One vLLM module's deltas for one adapter: flat positions into its local (out, in) weight, sorted, with their row
    offsets (the native SpMM's layout), and their values."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        order = torch.argsort(indices)
        dtype = torch.int32 if shape[0] * shape[1] < 2 ** 31 else torch.int64
        self.indices, self.values, self.shape = indices[order].to(dtype), values[order], shape
        self.row_ptr = build_layout(self.indices, shape, columns=False).row_ptr

    def to(self, device: torch.device) -> "ModuleDeltas":
        moved = object.__new__(ModuleDeltas)
        moved.indices, moved.row_ptr, moved.shape = self.indices.to(device), self.row_ptr.to(device), self.shape
        moved.values = self.values.to(device, torch.float32)  # (values stay fp32, as the library applies them)
        return moved

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out += x S^T, S holding the deltas (out is (T, out_features), x (T, in_features))."""
        implementation(resolve("auto", x.device)).spmm_(out, x, self.indices, self.values, self.row_ptr)


def uses_table(device: torch.device) -> bool:
    return device.type != "cpu" or os.environ.get("APET_BACKEND") == "triton"


def slot_capacity(max_lora_rank: int, shape: tuple[int, int]) -> int:
    """Deltas a slot of a (out, in) layer holds: a LoRA adapter's parameter count at vLLM's max_lora_rank."""
    return max_lora_rank * (shape[0] + shape[1])


class ModuleSlots:
    """The APET deltas in one vLLM LoRA layer's slots (``n_slots``: vLLM's max_loras); values in fp32."""

    def __init__(self, n_slots: int, shape: tuple[int, int], capacity: int, device: torch.device):
        self.shape, self.capacity, self.device = shape, capacity, device
        self.held: dict[int, ModuleDeltas | None] = {}  # (None in a table: the table holds them)
        self.table = stack_slots([None] * n_slots, shape, capacity, torch.float32, device) \
            if uses_table(device) else None

    def put(self, slot: int, deltas: ModuleDeltas | None) -> None:
        """Slot ``slot`` holds ``deltas`` (None: no APET deltas), written in place. Loading checked the capacity."""
        self.held.pop(slot, None)
        if self.table is None:
            if deltas is not None:
                self.held[slot] = deltas.to(self.device)
            return
        if deltas is None:
            self.table.row_ptr[slot].zero_()
            return
        one = stack_slots([(deltas.indices, deltas.values)], self.shape, self.capacity, torch.float32, self.device)
        for mine, new in zip(self.table, one):
            mine[slot].copy_(new[0])
        self.held[slot] = None

    def clear(self) -> None:
        for slot in list(self.held):
            self.put(slot, None)

    def lora_term_needed(self, token_slots: torch.Tensor) -> bool:
        """Whether any token's slot may hold LoRA weights (per-slot way only: a host sync)."""
        return self.table is not None or not set(token_slots.unique().tolist()) <= {-1, *self.held}

    def add(self, output: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor) -> None:
        """output[t] += S_slot(t) x[t] for every token whose slot holds APET deltas (output, x: (T, .); token_slots:
        (T,), -1 where a token has none, padding included)."""
        if self.table is not None:
            implementation("triton").slot_spmm_(output, x, token_slots, *self.table)
            return
        for slot, deltas in self.held.items():
            rows = (token_slots == slot).nonzero().squeeze(1)
            if rows.numel() == x.shape[0] and output.is_contiguous():
                deltas.add_to(output, x)
            elif rows.numel():
                part = output.index_select(0, rows)
                deltas.add_to(part, x.index_select(0, rows))
                output.index_copy_(0, rows, part)
