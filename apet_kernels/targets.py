"""Which linear layers of a model an ApetConfig tunes, how many deltas each gets, and the atomic swap
of modules that patching (and bench/ and python/) share."""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

import torch.nn as nn

from .config import ApetConfig
from .errors import ApetValueError
from .linear_like import is_linear_like, linear_shape
from .load_guard import guard_ancestors
from .selection import split_budget

# Output layers that "all-linear" leaves alone (PEFT excludes the output layer too).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def matches(name: str, spec) -> bool:
    """``spec``: None, a regex matched against the whole name, or a list of names / name suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def within(name: str, spec) -> bool:
    """True if module ``name`` or one of its ancestors matches ``spec``."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), spec) for i in range(1, len(parts) + 1))


def targeted(name: str, config: ApetConfig) -> bool:
    """Whether ``config`` targets the module called ``name`` (find_targets also leaves out the output
    embeddings under "all-linear", by identity)."""
    if config.target_modules == "all-linear":
        ok = not any(part in HEAD_NAMES for part in name.split("."))
    else:
        ok = matches(name, config.target_modules)
    return ok and not (matches(name, config.exclude_modules) or matches(name, config.modules_to_save))


def fuses_output_layer(model: nn.Module) -> bool:
    """True when the model's forward computes its loss from the output layer's weight directly, not by
    calling the module: Liger-Kernel's fused linear-cross-entropy (``apply_liger_kernel_to_llama`` and
    friends replace the model's ``forward`` by theirs)."""
    forward = getattr(model, "forward", None)
    forward = getattr(forward, "__func__", forward)
    return getattr(forward, "__module__", "").startswith("liger_kernel") and "lce" in getattr(forward, "__name__", "")


def output_embeddings(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def read_directly(model: nn.Module) -> dict[str, str]:
    """Linear modules whose weight their parent reads directly instead of calling them (deltas there would get
    no gradient): name -> why. nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward."""
    return {f"{name}.out_proj" if name else "out_proj": "nn.MultiheadAttention reads out_proj.weight directly"
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def find_targets(model: nn.Module, config: ApetConfig) -> dict[str, nn.Module]:
    """Qualified name -> linear-like module to patch, or APET layer to add an adapter to, in model order."""
    head = output_embeddings(model)
    direct = read_directly(model)
    targets = {}
    apet = [name + "." for name, m in model.named_modules() if getattr(m, "_apet_layer", False)]
    for name, module in model.named_modules():
        # an APET layer is a target under its own name (a further adapter goes into it), never its base layer
        if not name or any(name.startswith(a) for a in apet):
            continue
        if not (is_linear_like(module) or getattr(module, "_apet_layer", False)):
            continue
        if (config.target_modules == "all-linear" and (module is head or name in direct)) or not targeted(name, config):
            continue
        if name in direct:
            raise ApetValueError(f"{name!r} cannot take deltas: {direct[name]}, so they would never reach the output or "
                             f"get a gradient; exclude it (target_modules='all-linear' does)")
        targets[name] = module
    if not targets:
        raise ApetValueError(f"target_modules={config.target_modules!r} matches no nn.Linear / Conv1D in this model")
    fused = [name for name, m in targets.items() if m is head]
    if fused and fuses_output_layer(model):
        raise ApetValueError(f"{fused[0]!r}: this model's forward is Liger-Kernel's fused linear-cross-entropy, which reads "
                         f"the output layer's weight directly, so deltas there would not reach the loss; exclude it "
                         f"(target_modules='all-linear' does) or apply Liger with fused_linear_cross_entropy=False")
    return targets


def _model_dims(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    hidden = next((getattr(cfg, a) for a in ("hidden_size", "n_embd", "d_model") if getattr(cfg, a, None)), None)
    layers = next((getattr(cfg, a) for a in ("num_hidden_layers", "n_layer", "num_layers") if getattr(cfg, a, None)),
                  None)
    if hidden is None or layers is None:
        raise ApetValueError("budget_like adapter/prompt needs model.config with a hidden size and a layer count")
    layers += getattr(cfg, "num_decoder_layers", 0) if getattr(cfg, "is_encoder_decoder", False) else 0
    return hidden, layers


def budget_like_count(model: nn.Module, spec: str, targets: dict[str, nn.Module]) -> int:
    """The trainable-parameter count of another PET method on this model (the paper's budgets)."""
    kind, _, arg = spec.partition(":")
    params = dict(p.split("=") for p in arg.split(",") if p) if arg else {}
    try:
        if kind == "lora":
            r = int(params["r"])
            return sum(r * (o + i) for o, i in (linear_shape(m) for m in targets.values()))
        if kind == "bitfit":
            return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
        if kind == "adapter":
            d = int(params["d"])
            hidden, layers = _model_dims(model)
            return layers * 2 * (2 * hidden * d + d + hidden)  # two bottleneck adapters per layer
        if kind == "prompt":
            hidden, _ = _model_dims(model)
            return int(params["n"]) * hidden
    except (KeyError, ValueError) as exc:
        raise ApetValueError(f"cannot read budget_like={spec!r}: {exc}") from None
    raise ApetValueError(f"unknown budget_like {spec!r}; use lora:r=R, bitfit, adapter:d=D or prompt:n=N")


def layer_budget(model: nn.Module, config: ApetConfig, modules: dict[str, nn.Module],
                 shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Each target's K: the config's budget (budget_like, num_params or density) split by size."""
    if config.budget_like is not None:
        return split_budget(shapes, num_params=budget_like_count(model, config.budget_like, modules))
    return split_budget(shapes, num_params=config.num_params, density=config.density)


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters that appear under more than one name (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module],
                    targets: Iterable[str] | ApetConfig | None = None) -> dict[str, nn.Module]:
    """Swap linear-like modules of ``model``, in place, for ``make(name, module)``.

    ``targets``: qualified module names, or an ``ApetConfig`` whose ``target_modules`` /
    ``exclude_modules`` pick them (default: ``ApetConfig``'s ``"all-linear"``, output heads excluded).
    If ``make`` raises, every module swapped so far is put back (a new module that claimed its weight,
    like SparseDeltaLinear, releases it) and the error propagates: the model is as it was. Returns
    qualified name -> new module, in model order. Parameters' ``requires_grad`` flags are left alone.
    Every module above a new APET layer checks a whole state dict before any of it loads
    (apet_kernels.load_guard).
    """
    if targets is None or isinstance(targets, ApetConfig):
        names = list(find_targets(model, targets if targets is not None else ApetConfig(num_params=0)))
    else:
        names = list(targets)
    originals = {name: model.get_submodule(name) for name in names}  # (a missing name fails here, before any swap)
    new: dict[str, nn.Module] = {}
    try:
        for name, module in originals.items():
            new[name] = make(name, module)
            set_module(model, name, new[name])
    except BaseException:
        for name, module in new.items():
            set_module(model, name, originals[name])
            release = getattr(module, "release_weight", None)
            if callable(release):
                release()
        raise
    guard_ancestors(model)
    return new
