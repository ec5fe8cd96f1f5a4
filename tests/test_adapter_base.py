"""The adapter knows its base: fingerprints, config reuse, modules_to_save restored by unload()."""

import json
import warnings

import pytest
import torch

from _helpers import tiny_llama
from apet_kernels import ApetConfig, get_apet_model, load_apet

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_adapter_stores_a_fingerprint_of_its_base(tmp_path):
    model = get_apet_model(tiny_llama(0), ApetConfig(density=0.05))
    model.save_apet(str(tmp_path))
    layers = json.loads((tmp_path / "apet_config.json").read_text())["adapters"]["default"]["layers"]
    assert all(len(info["base_fingerprint"]) == 16 for info in layers.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: no warning
        load_apet(tiny_llama(0), str(tmp_path), strict=True)


def test_loading_onto_another_base_warns_or_refuses_with_strict(tmp_path):
    get_apet_model(tiny_llama(0), ApetConfig(density=0.05)).save_apet(str(tmp_path))
    with pytest.warns(UserWarning, match=r"base fingerprint mismatch in 14 of 14 adapter layers \(model\.layers\.0"):
        load_apet(tiny_llama(1), str(tmp_path))
    other = tiny_llama(1)
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(ValueError, match="fingerprint mismatch.*strict=True"):
        load_apet(other, str(tmp_path), strict=True)
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items())


def test_fingerprint_follows_new_base_weights(tmp_path):
    # an adapter re-based on other weights (load_state_dict of a base checkpoint) is saved with the new base
    model = get_apet_model(tiny_llama(0), ApetConfig(density=0.05))
    model.load_state_dict(tiny_llama(1).state_dict(), strict=False)
    model.save_apet(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_apet(tiny_llama(1), str(tmp_path), strict=True)


def test_reusing_one_config_for_two_models_keeps_the_first_adapter(tmp_path):
    config = ApetConfig(density=0.05)
    first = get_apet_model(tiny_llama(0), config)
    first_layers = dict(first.apet_config.layers)
    get_apet_model(tiny_llama(0, hidden_size=48), config)  # other shapes
    assert config.layers == {}, "get_apet_model changed the caller's config"
    assert first.apet_config.layers == first_layers
    first.save_apet(str(tmp_path))
    load_apet(tiny_llama(0), str(tmp_path))  # the first adapter still loads onto its own model


def test_unload_restores_modules_to_save(tmp_path):
    base = _bert()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_apet_model(base, ApetConfig(density=0.05, modules_to_save=["classifier"]))
    inputs = {"input_ids": torch.randint(3, 99, (2, 9)), "labels": torch.tensor([0, 2])}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs).loss.backward()
    opt.step()
    assert not torch.equal(base.classifier.weight, original["classifier.weight"])
    trained = base.classifier.weight.detach().clone()
    model.save_apet(str(tmp_path))
    restored = model.unload()
    for name, p in restored.named_parameters():
        assert torch.equal(p, original[name]), f"unload() left {name} changed"
    merged = load_apet(_bert(), str(tmp_path)).merge_and_unload()
    assert torch.equal(merged.classifier.weight, trained)  # merging keeps what was trained
