"""What a SparseDeltaLinear's state dict holds and how a load lands in it, as functions its hooks call.

Keys: ``base_layer.weight`` / ``.bias`` (the base weight: a merged layer restores W at its positions first, and writes
W + S again at its next forward) and, per adapter, ``deltas.<name>.values`` / ``.indices`` / ``.base`` / ``.merged``.
``merged`` is true only in checkpoints of 0.3, whose weight held W + S of that adapter; a load makes it pure from the
base saved with it. 0.1/0.2's flat keys are moved to where they live now.
"""

from __future__ import annotations

import torch

from .._checks import check_finite, check_index_content, check_index_meta
from ..errors import ApetValueError
from ..ops.layout import build_layout
from ..load_guard import already_checked
from ..zero3 import is_gathered, is_partitioned
from .ownership import claim, refuse_memory_of_a_merged_layer

# state-dict keys of 0.1 layers (one adapter, flat keys) -> where they live now
_LEGACY_BASE_KEYS = ("weight", "bias")
_LEGACY_DELTA_KEYS = {"delta_values": "values", "delta_indices": "indices", "delta_base": "base"}


# Keys: base_layer.weight/bias and, for every adapter, deltas.<name>.values / .indices / .base / .merged. A
# merged layer's weight is saved as W + S of its active adapter, whose ``merged`` flag says so; a load puts
# the pure W back at that adapter's positions from the base saved with it, whatever adapter is active here.
def before_state_dict(module, prefix, keep_vars) -> None:
    module._strategy.before_state_dict(module)  # (merged: W restored at the K positions)
    with torch.no_grad():  # no weight saved now holds W + S (a flag loaded from a 0.3 checkpoint is cleared)
        for delta in module.deltas.values():
            if not delta.merged.is_meta:
                delta.merged.fill_(False)


def upgrade(layer, state_dict, prefix: str) -> None:
    """Move 0.1/0.2's flat keys (``weight``/``bias`` of an unpatched checkpoint; ``delta_values``,
    ``delta_indices``, ``delta_base`` of a one-adapter layer, whose saved weight held W + S when it came with
    a base) to where they live now, in place."""
    for name in _LEGACY_BASE_KEYS:
        old, new = prefix + name, prefix + "base_layer." + name
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
    active = f"{prefix}deltas.{layer.active_adapter}."
    for old, new in _LEGACY_DELTA_KEYS.items():
        if prefix + old in state_dict and active + new not in state_dict:
            state_dict[active + new] = state_dict.pop(prefix + old)
            if new == "base" and active + "merged" not in state_dict:
                state_dict[active + "merged"] = torch.tensor(prefix + "base_layer.weight" in state_dict)


def incoming_merged(layer, state_dict, prefix: str) -> str | None:
    """The adapter whose W + S the incoming weight holds, if it comes with one."""
    found = [n for n in layer.deltas if bool(state_dict.get(f"{prefix}deltas.{n}.merged", False))]
    if len(found) > 1:
        raise ApetValueError(f"{prefix}deltas: several adapters ({found}) are marked merged; a weight holds one at most")
    return found[0] if found else None


def check(layer, state_dict, prefix: str = "", assign: bool = False) -> None:
    """Everything load_state_dict would put in this layer, checked before anything is copied (``assign``: the
    incoming tensors become this layer's own)."""
    numel = layer.out_features * layer.in_features
    incoming = state_dict.get(f"{prefix}base_layer.weight")
    if assign and torch.is_tensor(incoming):
        refuse_memory_of_a_merged_layer(incoming, layer._strategy.holds_sum, other_than=layer)
    for name in ("weight", "bias"):
        mine = getattr(layer.base_layer, name, None)
        t = state_dict.get(f"{prefix}base_layer.{name}")
        if t is not None and mine is not None and torch.is_tensor(t) and t.shape != mine.shape:
            raise ApetValueError(f"{prefix}base_layer.{name} has shape {tuple(t.shape)}, this layer's is "
                             f"{tuple(mine.shape)}")
    for adapter, delta in layer.deltas.items():
        key = f"{prefix}deltas.{adapter}."
        idx = state_dict.get(key + "indices")
        vals = state_dict.get(key + "values")
        if delta.k and delta.indices.is_meta and idx is None and torch.is_tensor(vals) and not vals.is_meta:
            # (assign=True would give real values over positions that stay on meta: a silent base forward;
            # a copy into meta tensors loads nothing)
            raise ApetValueError(f"{key}values: this layer's positions are on the meta device and the state dict "
                             f"carries none ({key}indices). Call model.to_empty(device=...) before loading "
                             "(seeded positions are drawn there), or load a state dict that holds the indices")
        if idx is not None:
            try:
                check_index_meta(idx, numel)
                if idx.numel() != delta.k:
                    raise ApetValueError(f"it has {idx.numel()} entries, this layer has {delta.k}")
                if not idx.is_meta:
                    check_index_content(idx, numel)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{key}indices: {exc}") from None
        values = state_dict.get(key + "values")
        if not (is_placeholder(delta.values) and torch.is_tensor(values) and values.shape == delta.values.shape):
            check_float_entry(values, key + "values", delta.k, finite=True)
        check_float_entry(state_dict.get(key + "base"), key + "base", delta.k, finite=False)
    merged = incoming_merged(layer, state_dict, prefix)
    if merged is not None and f"{prefix}deltas.{merged}.base" not in state_dict:
        raise ApetValueError(f"{prefix}deltas.{merged}.merged says the weight holds W + S, but its base is missing")


def before_load(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    upgrade(layer, state_dict, prefix)
    if not already_checked(error_msgs):  # (an ancestor checked the whole state dict: apet_kernels.load_guard)
        check(layer, state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
    incoming = {n for n in ("base_layer.weight",) if prefix + n in state_dict}
    incoming |= {n for n in layer.deltas if f"{prefix}deltas.{n}.indices" in state_dict}
    layer._incoming = (frozenset(incoming), incoming_merged(layer, state_dict, prefix) if incoming else None)
    # the positions may move and the weight may be replaced: start from the pure W
    layer._strategy.before_load(layer)


@torch.no_grad()
def after_load(module, incompatible_keys) -> None:
    incoming, merged = module.__dict__.pop("_incoming", (frozenset(), None))
    for name in incoming & set(module._awaited):
        del module._awaited[name]  # (rebuilt and read below)
    if not module.deltas or module.weight.is_meta or next(iter(module.deltas.values())).indices.is_meta:
        return
    for name in module.deltas:
        if name in incoming:
            module.deltas[name].rebuild_layout()
    if not incoming:
        return  # values (and bases saved beside them) only: W and the positions are as they were
    if merged is not None and "base_layer.weight" in incoming and module.quantization is None:
        # the loaded W holds W + S of that adapter (saved merged): its saved base makes it pure (a quantized
        # weight is never merged, and never written)
        delta = module.deltas[merged]
        module._weight.put(delta.indices, delta.base)
    # W is pure here: every adapter's base is read from it again (a new base model re-bases the deltas)
    module._weight.reread_base()
    for name, delta in module.deltas.items():
        if name != module.active_adapter and delta.k:
            delta.base.copy_(module.base_values_at(delta.indices))
    module._strategy.after_load(module)
    claim(module)  # assign=True may have brought a new weight


def is_placeholder(param: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter between gathers: DeepSpeed's own checkpoints hold its empty placeholder (the
    values come back through its optimizer's partitions)."""
    return is_partitioned(param) and not is_gathered(param)


def check_float_entry(t, key: str, k: int, finite: bool) -> None:
    if t is None:
        return
    if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != (k,):
        raise ApetValueError(f"{key} must be a float tensor of shape ({k},), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if finite and not t.is_meta:
        check_finite(t, key)


def check_buffers(layer) -> None:
    """APET_VALIDATE=1: indices in range, sorted, unique and consistent with the row offsets."""
    numel = layer.out_features * layer.in_features
    for name, delta in layer.deltas.items():
        check_index_meta(delta.indices, numel)
        check_index_content(delta.indices, numel)
        rows = build_layout(delta.indices, (layer.out_features, layer.in_features), columns=False).row_ptr
        if not torch.equal(rows.cpu(), delta.row_ptr.cpu()):
            raise ApetValueError(f"adapter {name!r}: indices changed in place since the layer was built or loaded; "
                             f"change positions through load_state_dict or set_positions")
