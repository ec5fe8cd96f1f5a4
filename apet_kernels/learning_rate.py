"""The learning rate to start from, by position scheme and budget: what python/study.py measured (issue 21).

Measured with AdamW (no weight decay), linear warm-up over 10% of the steps and linear decay, one short epoch
with a fresh classification head, as ``python/finetune.py`` trains (``python/results/README.md``):

- random positions: K = 10⁴ tuned scalars were best at 3e-2 on MiniLM-L6 (22M) and on Gemma 3 270M, the
  highest rate probed; K = 10⁵ at 1e-2 on MiniLM; about 3.3·10⁵ (LoRA r=8's count on MiniLM) at 1e-2. Rows share
  random's suggestion: on MiniLM's held-out probes they chose the same rates at 10⁴ and 10⁵, but on Gemma at 10⁵
  (chosen on the dev set) they were best at 3e-3.
- data-chosen positions run colder as K grows: magnitude at 3e-2 for K = 10⁴ on MiniLM (on Gemma 1e-2, 0.2
  points above 3e-2), 1e-2 for 10⁵ and 3e-3 for 3.3·10⁵; gradient at 1e-2 for K = 10⁴, 3e-3 for 10⁵ (the plain
  score and the xnorm and corr scores alike) and 1e-3 for 3.3·10⁵, where 1e-2 cost it 12 points (70.0% against
  81.7%). Published work agrees (LoTA 0.1x, RoSA ~0.3x of LoRA's rate; SHiRA's random positions 2.5-3x hotter
  than LoRA).

Which points were chosen how: at K = 10⁴ and 10⁵ every scheme's rate was chosen on MiniLM on a held-out slice of
the training split, never on the reported dev set (``python/results/PROTOCOL.md``, ``protocol_minilm_probe.jsonl``,
one grid 1e-3..3e-2 and two probe seeds per point: 10⁴ random, rows, magnitude 3e-2, gradient 1e-2; 10⁵ random,
rows, magnitude 1e-2, gradient 3e-3). The 3.3·10⁵ points (MiniLM) and Gemma's were chosen on the dev set they
were reported on (issue 21); no held-out probe has run on Gemma.

Between measured budgets the rate is interpolated in log-log; outside them it follows random positions' slope
from 10⁴ to 3.3·10⁵ (about K^-0.31) and stays within [1e-4, 3e-2]. It is where to start, not a tuned optimum: one
task (SST-2), two models, one or two seeds per probe.

A warning is raised once per optimizer when magnitude or gradient positions are trained at more than 3x their
suggested rate, the region where the study saw them fall behind.
"""

from __future__ import annotations

import bisect
import math
import warnings
import weakref

import torch

from . import process_hooks
from ._checks import is_int
from .errors import ApetTypeError, ApetValueError
from .schemes import SCHEMES

# scheme -> ((K, best learning rate), ...) by increasing K. K = 10^4 and 10^5: MiniLM's held-out probes
# (python/results/protocol_minilm_probe.jsonl); 3.3e5: MiniLM's dev-set probes (scaling_*.md, positions_lr_probe_sst2)
# (the points live in the scheme table, apet_kernels.schemes)
MEASURED = {name: s.lr_points for name, s in SCHEMES.items() if s.lr_points}
SAME_AS = {name: s.same_lr_as for name, s in SCHEMES.items() if s.same_lr_as}
SLOPE = math.log(1e-2 / 3e-2) / math.log(3.3e5 / 1e4)   # random positions' d log(lr) / d log(K), ~ -0.31
LR_RANGE = (1e-4, 3e-2)                                  # 3e-2: the highest rate probed
UNSTABLE_FACTOR = 3.0                                    # warn above this multiple of the suggestion
WARNED_METHODS = tuple(name for name, s in SCHEMES.items() if s.warn_above)


def suggested_lr(model_or_k, method: str | None = None) -> float:
    """The learning rate to start from for an APET adapter: ``suggested_lr(model)`` (a patched model: its
    active adapter's method and K) or ``suggested_lr(k, method)``."""
    if method is not None and not isinstance(method, str):
        raise ApetValueError(f"method must be a position scheme's name (a string), got {method!r}")
    if isinstance(model_or_k, torch.nn.Module):
        config = getattr(model_or_k, "apet_config", None)
        if config is None:  # a PeftModel of APET: its active adapter's config
            configs, active = getattr(model_or_k, "peft_config", None), getattr(model_or_k, "active_adapter", None)
            candidate = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
            config = candidate if type(candidate).__name__ == "ApetConfig" else None
        if config is None:
            raise ApetTypeError("suggested_lr(model) takes a model patched by get_apet_model / load_apet or an APET "
                                "PeftModel (or call suggested_lr(k, method))")
        k, method = _adapter_k(config), method or config.method
    elif is_int(model_or_k) and model_or_k > 0:
        k, method = int(model_or_k), method or "random"
    else:
        raise ApetValueError(f"suggested_lr takes a patched model or K, a positive int (the tuned scalars), got "
                         f"{model_or_k!r}")
    scheme = SAME_AS.get(method, method)
    if scheme not in MEASURED:
        raise ApetValueError(f"no suggested learning rate for method {method!r}; known: {sorted(MEASURED) + sorted(SAME_AS)}")
    points = MEASURED[scheme]
    log_k = math.log(max(k, 1))
    ks = [math.log(p[0]) for p in points]
    i = bisect.bisect_left(ks, log_k)
    if 0 < i < len(points):  # between two measured budgets
        (k0, lr0), (k1, lr1) = (ks[i - 1], math.log(points[i - 1][1])), (ks[i], math.log(points[i][1]))
        log_lr = lr0 + (lr1 - lr0) * (log_k - k0) / (k1 - k0)
    else:
        j = 0 if i == 0 else len(points) - 1
        log_lr = math.log(points[j][1]) + SLOPE * (log_k - ks[j])
    return float(min(max(math.exp(log_lr), LR_RANGE[0]), LR_RANGE[1]))


def _adapter_k(config) -> int:
    """An adapter's K: the tuned scalars over all its layers (recorded in its config)."""
    return sum(int(layer["k"]) for layer in config.layers.values())


def describe(model) -> str:
    """One line for ``print_trainable_parameters`` (a model patched in place)."""
    return describe_config(model.apet_config)


def describe_config(config) -> str:
    """The suggested-rate line for an adapter's config ("" where no rate is known for its positions)."""
    k = _adapter_k(config)
    try:
        lr = suggested_lr(k, config.method)
    except ValueError:
        return ""
    return (f"suggested lr (AdamW, linear warm-up and decay; python/study.py): {lr:.1e} for "
            f"{config.method} positions at K={k:,d}")


# ----------------------------------------------------------------------------- the warning
_HINT = "_apet_lr_hint"  # on an adapter's values Parameters: (suggested lr, method, K)
_CHECKED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def note_adapter(users, values, method: str, k: int) -> None:
    """Mark an adapter's values Parameters with the rate its method was found to bear (called when an adapter
    is created); the optimizer check is installed the first time a warned method appears."""
    if method not in WARNED_METHODS:
        return
    hint = (suggested_lr(k, method), method, int(k))
    for p in values:
        setattr(p, _HINT, hint)
    for user in users:  # (the layers holding the adapter: the check goes when the last is unloaded)
        process_hooks.add_optimizer_check(user, _check_step)


def _check_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    for group in optimizer.param_groups:
        # a scheduler's warm-up starts low: judge the rate it ramps to
        lr = group.get("initial_lr", group.get("lr"))
        hints = {getattr(p, _HINT) for p in group["params"] if hasattr(p, _HINT)}
        for suggested, method, k in hints:
            if isinstance(lr, (int, float)) and lr > UNSTABLE_FACTOR * suggested:
                warnings.warn(
                    f"{type(optimizer).__name__} trains APET {method} positions (K={k:,d}) at lr {lr:g}, more than "
                    f"{UNSTABLE_FACTOR:g}x the {suggested:.1e} suggested for them (apet_kernels.suggested_lr): in "
                    f"the study, {method} positions fell behind random ones at such rates (gradient positions at "
                    f"10x: 70.0% against 81.7% on SST-2). Random positions bear higher rates",
                    RuntimeWarning, stacklevel=3)
                return
