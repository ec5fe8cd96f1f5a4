"""The fine-tuning methods bench/compare.py puts side by side, each applied to the same model.

Every method patches the same target linears (all q/k/v/o and MLP projections) of a freshly
built model and returns the parameters its optimizer trains. Positions of the sparse methods
are the same everywhere (select_indices with the layer name as key), so dense-mask APET and
sparse APET train exactly the same scalars.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from apet_kernels import ApetConfig, DenseMaskLinear, get_apet_model
from apet_kernels.hf import find_targets, linear_shape, _set_module


class CloneScatterLinear(nn.Module):
    """What SpIEL's and SHiRA's released code do: copy W, scatter the deltas into the copy, and let
    autograd form the dense dW (out x in) to gather the K entries from. A baseline, not a method
    to use."""

    def __init__(self, linear: nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        idx = indices.long()
        self.register_buffer("rows", idx // self.weight.shape[1])
        self.register_buffer("cols", idx % self.weight.shape[1])
        self.register_buffer("base", self.weight.detach()[self.rows, self.cols].clone())
        self.values = nn.Parameter(torch.zeros(idx.numel(), device=self.weight.device))

    def forward(self, x):
        w = self.weight.detach().clone().index_put((self.rows, self.cols), (self.base.float() + self.values)
                                                    .to(self.weight.dtype))
        return F.linear(x, w, self.bias)


def _targets(model):
    return find_targets(model, ApetConfig(num_params=0))


def _budget_indices(model, num_params: int) -> dict[str, torch.Tensor]:
    """The positions sparse APET uses: get_apet_model's own split and selection, then unpatched."""
    apet = get_apet_model(model, ApetConfig(num_params=num_params))
    indices = {name: layer.delta_indices for name, layer in apet.apet_layers().items()}
    apet.unload()
    return indices


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)


def frozen(model, k, **_):
    _freeze(model)
    return model, [], {}


def sparse(model, k, strategy, backend, **_):
    apet = get_apet_model(model, ApetConfig(num_params=k, strategy=strategy, backend=backend))
    return apet, [p for p in apet.parameters() if p.requires_grad], {}


def _replace_each(model, k, make):
    _freeze(model)
    params = []
    for name, idx in _budget_indices(model, k).items():
        module = make(model.get_submodule(name), idx.to(next(model.parameters()).device))
        _set_module(model, name, module)
        params += [p for p in module.parameters() if p.requires_grad]
    return model, params, {}


def dense_mask(model, k, **_):
    return _replace_each(model, k, DenseMaskLinear.from_linear)


def clone_scatter(model, k, **_):
    return _replace_each(model, k, CloneScatterLinear)


def _matched_rank(model, k) -> int:
    per_rank = sum(sum(linear_shape(m)) for m in _targets(model).values())
    return max(1, round(k / per_rank))


def lora(model, k, **_):
    import peft
    r = _matched_rank(model, k)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=list(_short_names(model)),
                                                         lora_dropout=0.0))
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], {"rank": r}


def shira(model, k, **_):
    import peft
    r = _matched_rank(model, k)
    wrapped = peft.get_peft_model(model, peft.ShiraConfig(r=r, target_modules=list(_short_names(model)),
                                                          random_seed=0))
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], {"rank": r}


def full(model, k, **_):
    for p in model.parameters():
        p.requires_grad_(True)
    return model, [p for p in model.parameters()], {}


def _short_names(model):
    return sorted({n.split(".")[-1] for n in _targets(model)})


METHODS = {
    "frozen": frozen,
    "sparse merged": lambda m, k, backend, **kw: sparse(m, k, "merged", backend),
    "sparse unmerged": lambda m, k, backend, **kw: sparse(m, k, "unmerged", backend),
    "dense-mask": dense_mask,
    "clone-scatter": clone_scatter,
    "lora (peft)": lora,
    "shira (peft)": shira,
    "full fine-tuning": full,
}
NEEDS = {"lora (peft)": "peft", "shira (peft)": "peft.ShiraConfig"}
