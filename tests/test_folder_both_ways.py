"""One folder format for both entry points (issue 32): a folder saved in place (get_apet_model) loads through
PEFT (PeftModel.from_pretrained, load_adapter), and a folder PEFT saved loads in place (load_apet,
model.load_adapter), bit-exactly, seeded and stored positions, several adapters and modules_to_save."""

import os

import pytest
import torch

peft = pytest.importorskip("peft")

from _helpers import tiny_llama  # noqa: E402
from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model, load_apet  # noqa: E402

IDS = torch.randint(4, 99, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize(model, seed=1, adapter=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseDeltaLinear):
                v = m.deltas[adapter or m.active_adapter].values
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_a_folder_saved_in_place_loads_through_peft(tmp_path, method):
    model = get_apet_model(tiny_llama(), ApetConfig(num_params=600, method=method, modules_to_save=["lm_head"]))
    _randomize(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.25)
    model.add_adapter(ApetConfig(num_params=300, seed=4, target_modules=["q_proj"]), adapter_name="b")
    _randomize(model, seed=2, adapter="b")
    first = _logits(model)
    model.save_pretrained(tmp_path)
    assert {"apet_config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= \
        set(os.listdir(tmp_path)) and os.path.isfile(tmp_path / "b" / "adapter_config.json")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded), first)
    loaded.load_adapter(tmp_path / "b", "b")  # (modules_to_save are per adapter in PEFT: compare the deltas)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    for name, layer in loaded.named_modules():
        if isinstance(layer, SparseDeltaLinear):
            mine = ours[name.removeprefix("base_model.model.")].deltas["b"]
            assert torch.equal(layer.deltas["b"].indices, mine.indices) and torch.equal(layer.deltas["b"].values,
                                                                                       mine.values), name


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_a_folder_peft_saved_loads_in_place(tmp_path, method):
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method=method, modules_to_save=["lm_head"]))
    _randomize(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.25)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "apet_config.json")
    assert torch.equal(_logits(load_apet(tiny_llama(), str(tmp_path), strict=True)), expected)
    other = get_apet_model(tiny_llama(), ApetConfig(num_params=600, method=method))
    # an added adapter carries no modules_to_save: load the folder without them as a second adapter
    plain = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method=method))
    _randomize(plain, seed=3)
    plain.save_pretrained(tmp_path / "plain")
    other.load_adapter(str(tmp_path / "plain"), adapter_name="p")
    other.set_adapter("p")
    assert torch.equal(_logits(other), _logits(plain))


def test_a_peft_folder_of_another_method_is_refused_by_name(tmp_path):
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="type 'LORA', not an APET adapter"):
        load_apet(tiny_llama(), str(tmp_path))
