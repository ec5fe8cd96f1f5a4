"""apet_kernels.replace_linears: the public module swap (what bench/methods.py and python/finetune.py use)."""

import pytest
import torch.nn as nn

from _helpers import tiny_llama
from apet_kernels import ApetConfig, DenseMaskLinear, SparseDeltaLinear, replace_linears, select_indices


def test_default_targets_are_all_linears_but_the_head():
    model = tiny_llama()
    new = replace_linears(model, lambda name, m: DenseMaskLinear.from_linear(m, select_indices(m.weight.shape, 3)))
    assert len(new) == 14 and "lm_head" not in new
    assert all(model.get_submodule(n) is m and isinstance(m, DenseMaskLinear) for n, m in new.items())
    assert type(model.lm_head) is nn.Linear


def test_names_or_a_config_pick_the_targets():
    model = tiny_llama()
    new = replace_linears(model, lambda name, m: nn.Identity(), ["model.layers.0.mlp.up_proj"])
    assert list(new) == ["model.layers.0.mlp.up_proj"] and isinstance(model.model.layers[0].mlp.up_proj, nn.Identity)
    new = replace_linears(tiny_llama(), lambda name, m: nn.Identity(), ApetConfig(num_params=0, target_modules=["q_proj"]))
    assert list(new) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_failing_factory_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = {n: m for n, m in model.named_modules()}
    made = []

    def make(name, module):
        if len(made) == 5:
            raise RuntimeError("factory failed")
        made.append(SparseDeltaLinear.from_linear(module, k=4))
        return made[-1]

    with pytest.raises(RuntimeError, match="factory failed"):
        replace_linears(model, make)
    assert {n: m for n, m in model.named_modules()} == before
    # the weights the failed layers had claimed are free again: they can be wrapped now
    replace_linears(model, lambda name, m: SparseDeltaLinear.from_linear(m, k=4))
    with pytest.raises(AttributeError):
        replace_linears(model, lambda name, m: m, ["model.no_such_module"])
