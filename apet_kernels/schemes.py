"""Position schemes, in one table: what each needs to choose its positions, whether a saved adapter can store its
seed instead of its indices, and the learning rates it was measured to bear. The config's validation, both entry
points (apet_kernels.adapters.choosing), ``select_indices``, ``suggested_lr`` and the recipes' command lines read it.

``needs``: ``"seed"`` (drawn from the config's seed, the layer's name, its shape and K: the same positions on any
machine, so a folder stores the seed), ``"weight"`` (from the layer's base weight) or ``"data"`` (from calibration
batches); the last two are stored with the adapter. ``lr_points``: (K, best learning rate) by increasing K, where
they were measured (provenance in apet_kernels.learning_rate); ``same_lr_as``: a scheme whose rates it shares.
``warn_above``: an optimizer far above the suggested rate warns (such positions fell behind random ones there).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    name: str
    needs: str  # "seed", "weight" or "data"
    lr_points: tuple[tuple[float, float], ...] = ()
    same_lr_as: str | None = None
    warn_above: bool = False

    @property
    def seeded(self) -> bool:
        return self.needs == "seed"


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    # K = 10^4 and 10^5: MiniLM's held-out probes; 3.3e5: MiniLM's dev-set probes (apet_kernels.learning_rate)
    Scheme("random", "seed", lr_points=((1e4, 3e-2), (1e5, 1e-2), (3.3e5, 1e-2))),
    Scheme("rows", "seed", same_lr_as="random"),
    Scheme("cols", "seed", same_lr_as="random"),
    Scheme("blocks", "seed", same_lr_as="random"),
    Scheme("magnitude", "weight", lr_points=((1e4, 3e-2), (1e5, 1e-2), (3.3e5, 3e-3)), warn_above=True),
    Scheme("gradient", "data", lr_points=((1e4, 1e-2), (1e5, 3e-3), (3.3e5, 1e-3)), warn_above=True),
)}
SEEDED = tuple(name for name, s in SCHEMES.items() if s.seeded)


def is_seeded(name: str) -> bool:
    """Whether a scheme's positions regenerate from a seed (a saved adapter then stores no indices)."""
    scheme = SCHEMES.get(name)
    return scheme is not None and scheme.seeded
