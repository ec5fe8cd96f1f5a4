"""Positions that come with a checkpoint: an adapter built from a saved config whose positions are stored holds
placeholders of the right K until its checkpoint's indices replace them; the layer writes nothing into W meanwhile
and refuses a forward on the placeholders."""

from __future__ import annotations

import torch

from ..errors import ApetStateError
from ..selection import index_checksum


def expect(layer, adapter: str) -> None:
    """``adapter``'s positions are placeholders of the right K until a checkpoint's indices replace them (an
    adapter with stored positions, built from its saved config before its tensors are loaded). The layer
    writes nothing into W until then, and refuses a forward on the placeholders."""
    layer._awaited[adapter] = index_checksum(layer.deltas[adapter].indices)


@torch.no_grad()
def settle(layer) -> None:
    """Take up indices loaded by a loader that bypasses ``load_state_dict``'s hooks (transformers' own adapter
    loader assigns tensors directly): rebuild the orderings and read the base at the new positions (W is pure:
    nothing was written while they were awaited). Refuses if they never came."""
    for adapter, placeholder in list(layer._awaited.items()):
        delta = layer.deltas[adapter] if adapter in layer.deltas else None
        if delta is None:
            del layer._awaited[adapter]
            continue
        if delta.k and index_checksum(delta.indices) == placeholder:
            raise ApetStateError(f"adapter {adapter!r} stores its positions, and none were loaded into this layer: "
                                 "load its checkpoint (PeftModel.from_pretrained, load_adapter) before running it")
        delta.rebuild_layout()
        if adapter == layer.active_adapter:
            layer._weight.reread_base()
        else:
            delta.base.copy_(layer.base_values_at(delta.indices))
        del layer._awaited[adapter]
