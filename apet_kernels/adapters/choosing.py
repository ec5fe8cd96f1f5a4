"""Where an adapter's K scalars go: each target layer's positions (seeded, from the weights, or from data), the
budget split over the targets, and the values they start from. Both entry points choose through here."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..adapters.registry import first_few
from ..config import ApetConfig
from ..errors import (ApetValueError)
from ..layer import SparseDeltaLinear
from ..linear_like import is_conv1d, linear_shape, weight_oi
from ..zero3 import is_partitioned, whole
from ..positions import GradientScores
from ..quantized import dequantize, quantization_of, values_at
from ..schemes import SCHEMES
from ..selection import magnitude_indices, seeded_generator, select_indices
from ..targets import find_targets, layer_budget


def choose_positions(model: nn.Module, config: ApetConfig, calibration: Iterable | None = None,
                     loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Each target layer's positions (see get_apet_model), the budget split over the targets. Targets may be APET
    layers already (a further adapter): their positions are chosen on the base weight, never on W + S."""
    targets = find_targets(model, config)
    bases = {name: getattr(m, "base_layer", m) for name, m in targets.items()}
    shapes = {name: linear_shape(m) for name, m in bases.items()}
    budget = layer_budget(model, config, bases, shapes)
    needs = SCHEMES[config.method].needs  # (apet_kernels.schemes)
    if needs == "data":
        patched = [n for n, m in targets.items() if isinstance(m, SparseDeltaLinear)]
        if patched:
            raise ApetValueError(f"method='gradient' scores plain linear layers, and {first_few(patched)} already hold "
                                 "APET adapters: choose a further adapter's positions with another method, or load "
                                 "a folder that stores them (load_adapter)")
        if calibration is None:
            raise ApetValueError("method='gradient' chooses positions from data: pass calibration=<iterable of batches>")
        scores = GradientScores(model, targets, budget, score=config.gradient_score, pool_factor=config.pool_factor,
                                row_cap=config.row_cap, col_cap=config.col_cap, weight_of=float_weight_oi,
                                backend=config.backend)
        scores.accumulate(calibration, loss_fn)
        return scores.indices()
    if calibration is not None:
        raise ApetValueError(f"calibration data are only used by method='gradient', not {config.method!r}")
    if needs == "weight":
        return {name: magnitude_indices(base_weight_oi(m), budget[name]) for name, m in targets.items()}
    return {name: select_indices(shapes[name], budget[name], method=config.method, seed=config.seed, key=name)
            for name in targets}


def base_weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear-like module's or APET layer's base weight as floats (out, in): never W + S (a merged layer's
    active positions are read back from its saved base)."""
    if not isinstance(module, SparseDeltaLinear):
        return float_weight_oi(module)
    weight = float_weight_oi(module.base_layer)
    idx = module.delta_indices
    if not idx.numel():
        return weight
    weight = weight.clone()  # (a merged layer holds W + S there)
    weight.view(-1)[idx.long()] = module.base_values_at(idx).to(weight.dtype)
    return weight


def float_weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear-like module's weight as floats (out, in): a view, or a dequantized copy of a quantized one (or a
    gathered copy of a ZeRO-3 partitioned one: every rank calls this)."""
    if quantization_of(module) is not None:
        return dequantize(module)
    if is_partitioned(module.weight):
        w = whole(module.weight)
        return w.t() if is_conv1d(module) else w
    return weight_oi(module).detach()


def weight_at(module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """A linear-like module's weight at flat row-major (out, in) positions (dequantized if quantized)."""
    if quantization_of(module) is not None:
        return values_at(module, indices)
    w = float_weight_oi(module)
    idx = indices.long().to(w.device)
    return w[idx // w.shape[1], idx % w.shape[1]]


def initial_values(config: ApetConfig, adapter_name: str, indices: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The values an adapter starts from: none given (zeros: the model computes as its base) unless
    ``config.init_weights`` is False, PEFT's switch for an adapter that changes the output: N(0, 0.1^2), drawn
    from the config's seed, the layer's name and the adapter's, so they repeat on any machine."""
    if config.init_weights:
        return {}
    out = {}
    for name, idx in indices.items():
        gen = seeded_generator("init", config.seed, f"{name}:{adapter_name}", (idx.numel(),), idx.numel())
        out[name] = torch.randn(idx.numel(), generator=gen) * 0.1
    return out
