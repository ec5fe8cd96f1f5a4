"""Adapter names and per-layer budgets: the small rules every layer and both entry points check."""

from __future__ import annotations

from ..errors import ApetValueError

DEFAULT_ADAPTER = "default"


def budget(numel: int, k: int | None, density: float | None) -> int:
    if (k is None) == (density is None):
        raise ApetValueError("give exactly one of k or density")
    if k is None:
        if not 0.0 <= density <= 1.0:
            raise ApetValueError(f"density must lie in [0, 1], got {density}")
        k = round(density * numel)
    return k


def check_adapter_name(name) -> None:
    """Adapter names are module names (state-dict keys hold them): non-empty, no dots."""
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise ApetValueError(f"adapter names are non-empty strings without dots (and not '__base__'), got {name!r}")


def known_adapters(names, present, holder: str, what: str = "set_adapter") -> list[str]:
    """``names`` (a name or a list) as a list of distinct names among ``present`` (the adapters of a layer or of a
    model: ``holder`` says which, for the message)."""
    listed = [names] if isinstance(names, str) else list(names)
    if not listed or len(set(listed)) != len(listed):
        raise ApetValueError(f"{what} takes an adapter name or a list of distinct names, got {names!r}")
    unknown = [n for n in listed if n not in present]
    if unknown:
        raise ApetValueError(f"no adapter named {unknown[0]!r}; this {holder} has {list(present)}")
    return listed
