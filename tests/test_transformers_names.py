"""A patched model is still a transformers model (issue 32): the adapter methods it shares with transformers'
PeftAdapterMixin take transformers' signatures and meanings, and transformers' own PEFT code never runs on it
(``_hf_peft_config_loaded`` is not borrowed). Each case failed before: a TypeError for transformers' argument
order, a list refused by delete_adapter, disable_adapters() raising transformers' PEFT version error."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _helpers import tiny_llama  # noqa: E402
from apet_kernels import ApetConfig, get_apet_model  # noqa: E402

IDS = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _model():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    with torch.no_grad():
        for layer in model.apet_layers().values():
            layer.delta_values.normal_(0, 0.1)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_transformers_flag_is_not_borrowed():
    assert not getattr(_model(), "_hf_peft_config_loaded", False)


def test_add_adapter_in_transformers_order_and_in_peft_order():
    model = _model()
    model.add_adapter(ApetConfig(density=0.02, seed=3), adapter_name="x")  # transformers' order, by keyword
    model.add_adapter(ApetConfig(density=0.02, seed=4), "y")  # transformers' order, positional
    model.add_adapter("z", ApetConfig(density=0.02, seed=5))  # PEFT's order
    assert model.adapters == ["default", "x", "y", "z"]
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter(ApetConfig(density=0.02))  # no name: "default", as transformers
    with pytest.raises(TypeError, match="takes an ApetConfig"):
        model.add_adapter({"density": 0.02}, adapter_name="w")


def test_delete_adapter_takes_a_name_or_a_list_and_checks_all_first():
    model = _model()
    for name in ("x", "y", "z"):
        model.add_adapter(ApetConfig(density=0.02, seed=3), adapter_name=name)
    model.delete_adapter(["x", "y"])
    assert model.adapters == ["default", "z"]
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.delete_adapter(["z", "nope"])
    assert model.adapters == ["default", "z"]  # nothing deleted
    model.delete_adapter("z")
    assert model.adapters == ["default"]


def test_disable_adapters_and_enable_adapters_as_in_transformers():
    model = _model()
    adapted, base = _logits(model), _logits(tiny_llama())
    model.disable_adapters()
    assert torch.equal(_logits(model), base)
    model.enable_adapters()
    assert torch.equal(_logits(model), adapted)


def test_active_adapters_is_a_method_and_load_adapter_takes_transformers_arguments(tmp_path):
    model = _model()
    assert model.active_adapters() == ["default"] and model.active_adapter == "default"
    other = _model()
    other.save_pretrained(tmp_path)
    model.load_adapter(str(tmp_path), adapter_name="b")
    assert model.adapters == ["default", "b"]
    with pytest.raises(TypeError, match="'revision'.* not supported"):
        model.load_adapter(str(tmp_path), "c", revision="main")
    state = model.get_adapter_state_dict("b")
    assert state and all(".deltas.b." in k for k in state)
    with pytest.raises(NotImplementedError, match="set_adapter"):
        model.enable_peft_hotswap()
