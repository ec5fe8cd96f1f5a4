"""One adapter bookkeeping for both entry points (issue 32): a model patched in place keeps an AdapterRegistry, APET's
PEFT tuner a PeftAdapters over PEFT's own peft_config and active adapters; the same calls are refused with the same
messages through either, and a refused call leaves the model's outputs and adapters as they were."""

import pytest
import torch

peft = pytest.importorskip("peft")

from _helpers import tiny_llama  # noqa: E402
from apet_kernels import ApetConfig, get_apet_model  # noqa: E402
from apet_kernels.adapters.registry import AdapterRegistry, PeftAdapters  # noqa: E402
from apet_kernels.inplace.state import _patch_of  # noqa: E402

IDS = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _two_adapters(entry: str, strategy: str):
    config = ApetConfig(num_params=600, strategy=strategy, seed=3)
    second = ApetConfig(num_params=600, strategy=strategy, seed=4)
    if entry == "in place":  # (transformers' argument order there, PEFT's through PEFT)
        model = get_apet_model(tiny_llama(), config)
        model.add_adapter(second, "b")
    else:
        model = peft.get_peft_model(tiny_llama(), config)
        model.add_adapter("b", second)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in _layers(model).values():
            for delta in layer.deltas.values():
                delta.values.copy_(torch.randn(delta.values.shape, generator=g) * 0.1)
    return model


def _layers(model):
    from apet_kernels import SparseDeltaLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _registry(model):
    return _patch_of(model).adapters if hasattr(model, "apet_layers") else model.base_model.adapter_registry


def _switch(model, names):
    """set_adapter where each entry point takes a list: PEFT's PeftModel.set_adapter takes one name (and answers an
    unknown one itself), its tuner's takes lists (PEFT's way to apply several adapters)."""
    (model if hasattr(model, "apet_layers") else model.base_model).set_adapter(names)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_registry_is_the_models_own_state():
    in_place = _two_adapters("in place", "unmerged")
    registry = _registry(in_place)
    assert type(registry) is AdapterRegistry and list(registry.configs) == ["default", "b"]
    assert registry.active == ["default"] and in_place.active_adapters() == ["default"]
    wrapped = _two_adapters("peft", "unmerged")
    registry = _registry(wrapped)
    assert type(registry) is PeftAdapters
    assert registry.configs is wrapped.peft_config  # PEFT's dict itself, not a copy
    wrapped.set_adapter("b")
    assert registry.active == ["b"] == wrapped.active_adapters


REFUSALS = [  # (call, the message both entry points give)
    (lambda m: _switch(m, "nope"), "no adapter named 'nope'"),
    (lambda m: _switch(m, ["default", "default"]), "distinct names"),
]


@pytest.mark.parametrize("entry", ["in place", "peft"])
@pytest.mark.parametrize("case", range(len(REFUSALS)))
def test_the_same_refusals_through_both_entry_points(entry, case):
    model = _two_adapters(entry, "unmerged")
    before, call, message = _logits(model), *REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        call(model)
    assert list(_registry(model).configs) == ["default", "b"] and _registry(model).active == ["default"]
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize("entry", ["in place", "peft"])
def test_deleting_the_last_adapter_through_both(entry):
    """PEFT's convention (issue 41): the last adapter may go too; the layers then compute as their base layers."""
    model = _two_adapters(entry, "unmerged")
    model.set_adapter("b")
    model.delete_adapter("default")
    model.delete_adapter("b")
    assert list(_registry(model).configs) == [] and _registry(model).active == []
    inner = model if entry == "in place" else model.base_model.model  # (PEFT's own forward needs an adapter)
    assert torch.equal(_logits(inner), _logits(tiny_llama()))


@pytest.mark.parametrize("entry", ["in place", "peft"])
def test_several_adapters_refused_where_merged_through_both(entry):
    model = _two_adapters(entry, "merged")
    before = _logits(model)
    with pytest.raises(ValueError, match="adapters active together add their sparse terms unmerged"):
        _switch(model, ["default", "b"])
    assert _registry(model).active == ["default"] and torch.equal(_logits(model), before)


@pytest.mark.parametrize("entry", ["in place", "peft"])
def test_merging_two_active_adapters_refused_through_both(entry):
    model = _two_adapters(entry, "unmerged")
    _switch(model, ["default", "b"])
    before = _logits(model)
    with pytest.raises(ValueError, match=r"adapters \['default', 'b'\] are active together: set_adapter\(\) the one "
                                         "to merge"):
        model.merge_and_unload()
    assert torch.equal(_logits(model), before) and len(_layers(model)) == 14


@pytest.mark.parametrize("entry", ["in place", "peft"])
def test_a_mixed_batch_with_several_active_adapters_refused_through_both(entry):
    model = _two_adapters(entry, "unmerged")
    model.eval()
    _switch(model, ["default", "b"])
    with pytest.raises(ValueError, match="applies one adapter per row"):
        with torch.no_grad():
            model(input_ids=IDS, adapter_names=["default", "b"])
    assert _registry(model).mixed is None and all(m._mixed is None for m in _layers(model).values())
