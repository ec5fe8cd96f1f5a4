"""APET as a PEFT method (issue 32): ``peft.get_peft_model(model, ApetConfig(...))`` gives a PeftModel whose tuner
layers are SparseDeltaLinear, and PEFT's model-level API works on it: saving and ``PeftModel.from_pretrained``
(bit-exact), ``disable_adapter()``, several adapters, mixed batches, ``modules_to_save``, merging and unloading,
and the checks a load makes before it copies anything."""

import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from _helpers import tiny_llama  # noqa: E402
import apet_kernels  # noqa: E402
from apet_kernels import ApetConfig, ApetTuner, Regrower, SparseDeltaLinear  # noqa: E402
from apet_kernels.peft_registry import check_registration  # noqa: E402

IDS = torch.randint(4, 99, (3, 9), generator=torch.Generator().manual_seed(0))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _randomize(model, seed=1, adapter=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(model).values():
            values = layer.deltas[adapter].values if adapter else layer.delta_values
            values.copy_(torch.randn(values.shape, generator=g) * 0.1)


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _peft(strategy="auto", seed=0, **kw):
    return peft.get_peft_model(tiny_llama(seed), ApetConfig(num_params=600, strategy=strategy, **kw))


def test_importing_apet_kernels_registers_apet_where_peft_looks_it_up():
    check_registration()  # fails naming the cause if a PEFT release moves its registry
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    assert PEFT_TYPE_TO_CONFIG_MAPPING["APET"] is ApetConfig and PEFT_TYPE_TO_TUNER_MAPPING["APET"] is ApetTuner
    assert isinstance(ApetConfig(num_params=1), peft.PeftConfig) and ApetConfig(num_params=1).peft_type == "APET"


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_get_peft_model_gives_a_peft_model_of_apet_layers(strategy, capsys):
    model = _peft(strategy)
    assert isinstance(model, peft.PeftModel) and isinstance(model.base_model, ApetTuner)
    layers = _layers(model)
    assert len(layers) == 14 and all(m.strategy == strategy for m in layers.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".deltas.default.values" in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 600
    model.print_trainable_parameters()
    assert "trainable params: 600" in capsys.readouterr().out
    assert torch.equal(_logits(model), _logits(tiny_llama()))  # zero values: the base model's output


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_save_and_from_pretrained_round_trip_bit_exact(tmp_path, strategy):
    model = _peft(strategy)
    _randomize(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.endswith(".deltas.values") for k in saved)  # seeded positions: values only
    assert sum(t.numel() for t in saved.values()) == 600
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing-key or fingerprint warning (PEFT's own FutureWarning aside)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # is_trainable=False: inference
    trainable = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 600
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path), ApetConfig)


def test_data_driven_and_regrown_positions_are_stored_and_come_back(tmp_path):
    batches = [{"input_ids": IDS, "labels": IDS}]
    grad = apet_kernels.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method="gradient"), calibration=batches)
    mag = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method="magnitude"))
    regrown = _peft()
    opt = torch.optim.SGD([p for p in regrown.parameters() if p.requires_grad], lr=0.1)
    regrower = Regrower(regrown, opt, interval=1, fraction=0.5, total_steps=10)
    with regrower.observe():
        regrown(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    regrower.step()
    for i, model in enumerate((grad, mag, regrown)):
        _randomize(model, seed=i)
        folder = tmp_path / str(i)
        model.save_pretrained(folder)
        from safetensors.torch import load_file
        assert any(k.endswith(".deltas.indices") for k in load_file(folder / "adapter_model.safetensors"))
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), folder)
        assert torch.equal(_logits(loaded), _logits(model))
        for name, layer in _layers(loaded).items():
            assert torch.equal(layer.delta_indices, _layers(model)[name].delta_indices)


def test_gradient_positions_need_calibration_and_say_where_to_pass_it():
    base = tiny_llama()
    before = {n: t.clone() for n, t in base.state_dict().items()}
    with pytest.raises(ValueError, match="apet_kernels.get_peft_model"):
        peft.get_peft_model(base, ApetConfig(num_params=600, method="gradient"))
    assert not _layers(base) and all(torch.equal(t, before[n]) for n, t in base.state_dict().items())


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_disable_adapter_gives_the_base_output_and_keeps_a_pending_backward(strategy):
    model = _peft(strategy)
    _randomize(model)
    base = _logits(tiny_llama())
    loss = model(input_ids=IDS, labels=IDS).loss  # a forward whose backward runs after a reference pass
    with model.disable_adapter():
        assert torch.equal(_logits(model), base)
    assert not torch.equal(_logits(model), base)
    loss.backward()
    reference = _peft(strategy)
    _randomize(reference)
    reference(input_ids=IDS, labels=IDS).loss.backward()
    for name, layer in _layers(model).items():
        torch.testing.assert_close(layer.delta_values.grad, _layers(reference)[name].delta_values.grad)


def test_several_adapters_switch_delete_and_mix_per_row():
    model = _peft("unmerged")
    _randomize(model, seed=1)
    model.add_adapter("other", ApetConfig(num_params=300, seed=5, target_modules=["q_proj", "v_proj"],
                                          strategy="unmerged"))
    assert model.active_adapter == "default" and set(model.peft_config) == {"default", "other"}
    _randomize(model, seed=2, adapter="other")
    first = _logits(model)
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.other.values" in n for n in trainable)
    second = _logits(model)
    assert not torch.equal(first, second)
    model.eval()
    mixed = _logits(model, adapter_names=["default", "other", "__base__"])
    torch.testing.assert_close(mixed[0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], second[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2], _logits(tiny_llama())[2], rtol=1e-5, atol=1e-6)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert set(model.peft_config) == {"default"} and torch.equal(_logits(model), first)
    model.delete_adapter("default")  # the last one too, as PEFT's methods do (issue 41)
    assert model.peft_config == {} and all(not m.deltas for m in _layers(model).values())


def test_merged_layers_refuse_two_active_adapters_before_any_layer_changes():
    model = _peft("merged")
    model.add_adapter("other", ApetConfig(num_params=300, seed=5))
    with pytest.raises(ValueError, match="merged"):
        model.base_model.set_adapter(["default", "other"])
    assert all(m.active_adapters == ["default"] for m in _layers(model).values())


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_unload_gives_back_the_base_bit_exactly_and_merge_and_unload_its_sum(strategy):
    original = tiny_llama().state_dict()
    model = _peft(strategy)
    _randomize(model)
    expected = _logits(model)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM" and not _layers(merged)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    model = _peft(strategy)
    _randomize(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    plain = model.unload()
    assert not _layers(plain) and not hasattr(plain, "peft_config")
    state = plain.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)


def test_modules_to_save_train_save_and_load_through_peft(tmp_path):
    model = _peft(modules_to_save=["lm_head"])
    assert any("lm_head.modules_to_save.default" in n for n, p in model.named_parameters() if p.requires_grad)
    _randomize(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected)


def test_a_checkpoint_for_another_base_or_shape_or_without_its_positions_is_refused_or_named(tmp_path):
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method="magnitude"))
    _randomize(model)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="base fingerprint mismatch"):
        peft.PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        peft.PeftModel.from_pretrained(tiny_llama(intermediate_size=48), tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".indices")}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks the stored positions"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    save_file({k: v for k, v in tensors.items() if "q_proj" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="q_proj.deltas.values is missing"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_one_config_object_builds_several_models(method):
    """PEFT keeps the config object given (issue 41: it was copied); its records are this model's, and the same
    object builds another model with positions of its own (magnitude: from that model's weights)."""
    config = ApetConfig(num_params=600, method=method)
    first = peft.get_peft_model(tiny_llama(), config)
    second = peft.get_peft_model(tiny_llama(seed=1), config)
    assert first.peft_config["default"] is config is second.peft_config["default"] and config.layers
    for (n, a), b in zip(_layers(first).items(), _layers(second).values()):
        assert torch.equal(a.delta_indices, b.delta_indices) == (method == "random"), n
    _randomize(second)
    assert not torch.equal(_logits(second), _logits(tiny_llama(seed=1)))  # it runs: no positions awaited


def test_stored_positions_built_from_a_saved_config_refuse_to_run_until_their_checkpoint_loads(tmp_path):
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method="magnitude"))
    model.save_pretrained(tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)  # its layers say the positions are stored
    unloaded = peft.get_peft_model(tiny_llama(), config)
    with pytest.raises(RuntimeError, match="stores its positions, and none were loaded"):
        unloaded(input_ids=IDS)
    unloaded.load_adapter(tmp_path, "default")  # into the adapter just built (what Trainer's resume does)
    assert torch.equal(_logits(unloaded), _logits(model))


def test_meta_device_recipe_with_assign_refuses_values_without_positions_instead_of_running_the_base():
    """Issue 33's meta-device case through the PEFT entry point: values loaded with assign=True onto positions
    still on the meta device are refused with the way out, never a silent base forward."""
    with torch.device("meta"):
        base = tiny_llama()
    model = peft.get_peft_model(base, ApetConfig(num_params=600))
    weights = {"base_model.model." + k.replace("_proj.", "_proj.base_layer."): v
               for k, v in tiny_llama().state_dict().items()}
    values = {k: torch.ones(v.shape) for k, v in model.state_dict().items() if k.endswith(".values")}
    with pytest.raises(ValueError, match="to_empty"):
        model.load_state_dict({**weights, **values}, assign=True, strict=False)


def test_a_failed_strict_load_into_the_peft_model_changes_nothing():
    """Issue 33's strict-load defect through the PEFT entry point: torch reports missing keys only after copying
    everything else; the PeftModel over APET checks the key set first."""
    model = _peft()
    values = {k: v + 1 for k, v in model.state_dict().items() if k.endswith(".values")}
    full = {**model.state_dict(), **values}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for broken in ({k: v for k, v in full.items() if k != next(iter(values))}, {**full, "nonsense.weight": IDS}):
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            model.load_state_dict(broken)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.load_state_dict(full)  # the whole state dict loads
    assert all(torch.equal(model.state_dict()[k], v) for k, v in values.items())
    import copy
    import pickle
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert torch.equal(_logits(clone), _logits(model))


# ----------------------------------------------------------------------------- the fuzz round's findings (issue 33)
def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def test_a_failed_load_adapter_or_from_pretrained_leaves_the_model_as_it_was(tmp_path):
    source = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=600, method="magnitude"))
    _randomize(source)
    source.save_pretrained(tmp_path / "good")
    source.save_pretrained(tmp_path / "bad")
    _truncate(tmp_path / "bad")
    model = _peft()
    before, keys = _logits(model), set(model.state_dict())
    with pytest.raises(Exception, match="(?i)header|truncated|incomplete"):
        model.load_adapter(tmp_path / "bad", "mag")
    assert list(model.peft_config) == ["default"] and set(model.state_dict()) == keys
    assert torch.equal(_logits(model), before)  # (the half-added adapter awaited positions: the forward refused)
    base = tiny_llama()
    with pytest.raises(Exception, match="(?i)header|truncated|incomplete"):
        peft.PeftModel.from_pretrained(base, tmp_path / "bad")
    assert not _layers(base) and not hasattr(base, "peft_config")  # the caller's model has its own layers back
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(base, tmp_path / "good")), _logits(source))


def test_wrapping_a_wrapped_model_again_names_the_cause():
    model = _peft()
    with pytest.raises(RuntimeError, match="already holds APET layers with an adapter named 'default'"):
        peft.get_peft_model(model.base_model.model, ApetConfig(num_params=600))


def test_functional_call_runs_unmerged_and_names_the_way_out_when_merged():
    params = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
    unmerged = _peft("unmerged")
    _randomize(unmerged)
    assert torch.equal(torch.func.functional_call(unmerged, params(unmerged), (IDS,)).logits, _logits(unmerged))
    merged = _peft("merged")
    with pytest.raises(RuntimeError, match="functional_call.*strategy='unmerged'"):
        torch.func.functional_call(merged, params(merged), (IDS,))


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_a_forward_on_the_meta_device_gives_meta_outputs(strategy):
    model = _peft(strategy).to("meta")
    assert model(input_ids=IDS.to("meta")).logits.is_meta


def test_folders_apet_kernels_cannot_read_or_that_were_edited_are_refused_by_name(tmp_path):
    import json
    model = _peft()
    _randomize(model)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="adapter_model.bin.*safe_serialization=True"):
        apet_kernels.load_apet(tiny_llama(), str(tmp_path / "bin"))
    model.save_pretrained(tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "adapter_config.json").read_text())
    del config["layers"]["model.layers.0.mlp.down_proj"]
    (tmp_path / "edited" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="down_proj.deltas.values', a layer its config does not list"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "edited")


def test_a_sequence_classifier_adds_a_second_adapter_with_its_own_head_copy():
    import transformers
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99, num_labels=3))
    model = peft.get_peft_model(bert, ApetConfig(num_params=600, task_type="SEQ_CLS"))
    model.add_adapter("b", ApetConfig(num_params=300, seed=1, task_type="SEQ_CLS"))
    assert set(model.peft_config) == {"default", "b"}
    assert "b" in model.base_model.model.classifier.modules_to_save


@pytest.mark.parametrize("cap", [True, float("inf"), float("nan"), 0, -1])
def test_caps_must_be_positive_finite_numbers(cap):
    with pytest.raises(ValueError, match="row_cap must be a positive number"):
        ApetConfig(num_params=5, row_cap=cap)
