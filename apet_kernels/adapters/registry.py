"""The model-level adapter bookkeeping both entry points share: adapters by name (their configs, in the order added),
the active ones, a mixed-adapter batch in progress, and every check made before a layer changes (names, switching,
deleting, mixed batches, merging).

A model patched in place (apet_kernels.model) keeps an ``AdapterRegistry`` of its own. APET's PEFT tuner
(apet_kernels.tuner) keeps a ``PeftAdapters`` over PEFT's ``peft_config`` and active adapters themselves: PEFT does
the switching, and the same rules, with the same messages, are checked before it does. One state per model, one
copy of the rules.
"""

from __future__ import annotations

from ..errors import ApetStateError, ApetValueError
from ..layer import check_adapter_name, known_adapters
from .mixed_batch import BASE, MixedBatch


def first_few(names: list[str], n: int = 3) -> str:
    """A short list of names for a message: the first ``n`` and how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


class AdapterRegistry:
    """Adapters of one model: ``configs`` (name -> ApetConfig, in the order added), ``active`` (the adapter trained
    and applied, then others applied with it), ``mixed`` (the MixedBatch while one runs)."""

    def __init__(self, configs: dict | None = None, active: list[str] | None = None):
        self.configs = dict(configs or {})
        self.active = list(active or [])
        self.mixed = None

    @property
    def names(self) -> list[str]:
        """Adapter names, the active one first."""
        first = self.active[:1]
        return first + [n for n in self.configs if n not in first]

    # ----------------------------------------------------------------- checks (nothing has changed when they raise)
    def refuse_in_mixed_batch(self, what: str) -> None:
        if self.mixed is not None:
            raise ApetStateError(f"{what} inside a mixed-adapter batch would change what its rows apply")

    def check_new(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.configs:
            raise ApetValueError(f"an adapter named {name!r} exists already (delete_adapter it first)")
        self.refuse_in_mixed_batch("adding an adapter")

    def known(self, names, what: str = "set_adapter") -> list[str]:
        """``names`` (a name or a list) as a list of distinct adapters of this model."""
        return known_adapters(names, self.names, "model", what)

    def check_switch(self, layers: dict, names, way_out: str) -> list[str]:
        """What ``set_adapter(names)`` is refused for: unknown names, a mixed batch running, several adapters where a
        layer runs merged. Returns the names as a list."""
        names = self.known(names)
        self.refuse_in_mixed_batch("set_adapter()")
        refuse_several_where_merged(layers, names, way_out)
        return names

    def check_delete(self, names, *, active_ok: bool) -> list[str]:
        names = self.known(names, "delete_adapter")
        if not active_ok:
            for name in names:
                if name in self.active:
                    raise ApetValueError(f"{name!r} is active: set_adapter() another one before deleting it")
        self.refuse_in_mixed_batch("delete_adapter()")
        return names

    def check_single_active(self, what: str) -> None:
        if len(self.active) > 1:
            raise ApetValueError(f"adapters {self.active} are active together: set_adapter() the one to {what}")

    # ----------------------------------------------------------------- changes, all or nothing
    def switch(self, layers: dict, names, way_out: str) -> None:
        """Make ``names`` the active adapters on every layer (the first trained); checked first, and every layer
        goes back if one fails."""
        names = self.check_switch(layers, names, way_out)
        before, switched = list(self.active), []
        try:
            for layer in layers.values():
                layer.set_adapter(names)
                switched.append(layer)
        except BaseException:
            for layer in switched:  # (nothing fails after the checks; this keeps the model whole if it does)
                layer.set_adapter(before)
            raise
        self.active = names

    def delete(self, layers: dict, names) -> None:
        """Delete adapters (the last one too: the layers then compute as their base layers, as PEFT's do)."""
        listed = self.known(names, "delete_adapter")
        names = self.check_delete(listed, active_ok=set(listed) == set(self.configs))  # (all of them: active ones too)
        merged = sorted({n for m in layers.values() for n in m.merged_adapters if n in names})
        if merged:
            raise ApetValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        for name in names:
            for layer in layers.values():
                layer.delete_adapter(name)
            del self.configs[name]
            if name in self.active:
                self.active.remove(name)

    def begin_mixed(self, layers: dict, adapter_names, way_out: str, expand: bool = False,
                    training: bool = False) -> None:
        """Every layer runs the next forwards with one adapter per batch row (``"__base__"``: none). The refusals
        a PEFT user meets say what PEFT's say."""
        if training:
            raise ApetValueError("Cannot pass `adapter_names` when the model is in training mode.")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(self.configs) - {BASE})
        if unknown:
            raise ApetValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (this model has "
                                 f"{self.names}, and '{BASE}' for none)")
        if not names:
            raise ApetValueError("adapter_names is empty: give one name per batch row")
        if len(self.active) > 1:
            raise ApetValueError("a mixed-adapter batch applies one adapter per row: set_adapter() a single one first")
        if self.mixed is not None:
            raise ApetStateError("mixed-adapter batches do not nest")
        plan = MixedBatch(names, expand=expand)
        merged = _merged(layers)
        if merged:
            raise ApetValueError(f"a mixed-adapter batch runs unmerged, and {len(merged)} layers are merged "
                                 f"({first_few(merged)}): {way_out}")
        begun = []
        try:
            for layer in layers.values():
                layer.begin_mixed_batch(plan)
                begun.append(layer)
        except BaseException:
            for layer in begun:
                layer.end_mixed_batch()
            raise
        self.mixed = plan

    def end_mixed(self, layers: dict) -> None:
        for layer in layers.values():
            layer.end_mixed_batch()
        self.mixed = None


def _merged(layers: dict) -> list[str]:
    """The layers that apply one adapter at a time and do not unmerge by themselves (strategy='merged', or
    merge_adapter()): W + S lives in their weight."""
    return [n for n, m in layers.items() if not m.applies_several]


def refuse_several_where_merged(layers: dict, names: list[str], way_out: str) -> None:
    """Adapters active together add their sparse terms unmerged: refused, before any layer changes, where a layer
    runs merged."""
    merged = _merged(layers)
    if len(names) > 1 and merged:
        raise ApetValueError(f"adapters active together add their sparse terms unmerged, and {len(merged)} layers "
                             f"are merged ({first_few(merged)}): {way_out}")


class PeftAdapters(AdapterRegistry):
    """The registry of APET's PEFT tuner: its configs and active adapters are PEFT's own (``peft_config``,
    ``active_adapters``), read where PEFT keeps them; PEFT switches and deletes, after these checks."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.mixed = None

    @property
    def configs(self) -> dict:
        return self.tuner.peft_config

    @property
    def active(self) -> list[str]:
        return list(self.tuner.active_adapters)
