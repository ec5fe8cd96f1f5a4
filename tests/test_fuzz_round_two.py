"""Issue 33's second fuzz round (lifecycles, folders, meta devices): each case failed before its fix. Through the
PEFT entry point: calls on a PeftModel after unload(), a failed from_pretrained (NaN values, a meta-device base)
that must give the caller's base model back as it was. Folders: a PeftModel saved over an in-place save, stale
subfolders of an earlier PEFT save, the adapter order and strategy a folder is loaded with."""

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from _helpers import tiny_llama  # noqa: E402
from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model, load_apet  # noqa: E402
from apet_kernels.errors import AdapterFileError, ApetStateError  # noqa: E402

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.clone()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _apet_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]


def _randomize(model, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _apet_layers(model):
            for delta in layer.deltas.values():
                delta.values.add_(torch.randn(delta.values.shape, generator=g) * scale)


def _peft_model(strategy="merged"):
    model = peft.get_peft_model(tiny_llama(0), ApetConfig(num_params=600, strategy=strategy, seed=0))
    _randomize(model)
    return model


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_a_peft_model_refuses_adapter_calls_after_unload(tmp_path, how):
    model = _peft_model()
    model.save_pretrained(str(tmp_path / "good"))
    trained = _logits(model)
    base = getattr(model, how)()
    before, state = _logits(base), _state(base)
    calls = {"add_adapter": lambda: model.add_adapter("b", ApetConfig(num_params=10)),
             "load_adapter": lambda: model.load_adapter(str(tmp_path / "good"), "c"),
             "save_pretrained": lambda: model.save_pretrained(str(tmp_path / "good")),
             "set_adapter": lambda: model.base_model.set_adapter("default"),
             "unload": lambda: model.unload()}
    for name, call in calls.items():
        with pytest.raises(ApetStateError, match="this PeftModel was unloaded"):
            call()
    assert not _apet_layers(base) and torch.equal(_logits(base), before) and _same_state(_state(base), state)
    # the good adapter saved before is intact (save_pretrained wrote no empty adapter over it)
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "good"))), trained)
    get_apet_model(base, ApetConfig(num_params=100))  # the base can be patched again


def test_from_pretrained_of_nan_values_gives_the_base_back_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file
    _peft_model().save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("deltas.values"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(path))
    base = tiny_llama(0)
    before, state = _logits(base), _state(base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert not _apet_layers(base) and torch.equal(_logits(base), before) and _same_state(_state(base), state)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags  # PEFT froze them; given back


def test_from_pretrained_onto_a_meta_base_is_refused_by_name(tmp_path):
    _peft_model().save_pretrained(str(tmp_path))
    with torch.device("meta"):
        base = tiny_llama(0)
    with pytest.raises(ValueError, match="meta device"):
        peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert not _apet_layers(base)


def test_patching_under_a_meta_default_device_and_saving_before_materializing():
    with torch.device("meta"):
        model = get_apet_model(tiny_llama(0), ApetConfig(num_params=600))  # positions drawn on the CPU
    assert all(layer.delta_indices.is_meta for layer in _apet_layers(model))
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        model.save_pretrained("/nonexistent/never-written")


def test_a_peft_save_over_an_in_place_save_is_refused_not_loaded_stale(tmp_path):
    old = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, seed=0))
    _randomize(old, seed=1)
    old.save_pretrained(str(tmp_path))
    new = _peft_model()
    new.save_pretrained(str(tmp_path))  # PEFT's layout replaced, the in-place pair left as it was
    base = tiny_llama(0)
    before = _logits(base)
    with pytest.raises(AdapterFileError, match="two different adapters"):
        load_apet(base, str(tmp_path))
    assert not _apet_layers(base) and torch.equal(_logits(base), before)
    patched = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, seed=0))
    with pytest.raises(AdapterFileError, match="two different adapters"):
        patched.load_adapter(str(tmp_path), "x")
    assert patched.adapters == ["default"]
    # PEFT reads its own layout: the newer adapter
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path))), _logits(new))


def test_a_peft_layout_folder_gives_its_top_adapter_as_peft_does(tmp_path):
    two = _peft_model("unmerged")
    two.add_adapter("other", ApetConfig(num_params=300, seed=5, strategy="unmerged"))
    two.save_pretrained(str(tmp_path))  # default at the top, other/ in a subfolder
    one = _peft_model("unmerged")
    _randomize(one, seed=7)
    one.save_pretrained(str(tmp_path))  # the top replaced; other/ stays from the earlier save
    loaded = load_apet(tiny_llama(0), str(tmp_path))
    assert loaded.adapters == ["default"] and torch.equal(_logits(loaded), _logits(one))


def test_a_folder_keeps_the_adapter_order_and_the_strategy_it_was_patched_with(tmp_path):
    model = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, strategy="unmerged", seed=0,
                                                     modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    model.add_adapter(ApetConfig(num_params=200, seed=3), "aux")  # sorts before "default"
    _randomize(model)
    model.save_pretrained(str(tmp_path / "one"))
    assert list(json.loads((tmp_path / "one" / "apet_config.json").read_text())["adapters"]) == ["default", "aux"]
    loaded = load_apet(tiny_llama(0), str(tmp_path / "one"))
    assert {m.strategy for m in _apet_layers(loaded)} == {"unmerged"}
    assert torch.equal(_logits(loaded), _logits(model))
    model.set_adapter(["default", "aux"])  # saved with two adapters active together
    model.save_pretrained(str(tmp_path / "two"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_apet(tiny_llama(0), str(tmp_path / "two"))
    assert loaded.active_adapters() == ["default", "aux"] and torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("damage, message", [
    (lambda info: info.pop("k"), r"\['k'\] must be an int"),
    (lambda info: info.pop("checksum"), r"\['checksum'\] must be a string"),
    (lambda info: info.update(k="abc"), r"\['k'\] must be an int"),
    (lambda info: info.update(shape=[4]), r"\['shape'\] must be two positive ints"),
    (lambda info: info.update(positions="bogus"), r"\['positions'\] must be 'seed' or 'stored'"),
])
def test_a_damaged_layer_record_is_named_with_its_file(tmp_path, damage, message):
    model = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, seed=0))
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "apet_config.json"
    data = json.loads(path.read_text())
    damage(next(iter(data["adapters"]["default"]["layers"].values())))
    path.write_text(json.dumps(data))
    base = tiny_llama(0)
    with pytest.raises(ValueError, match=f"apet_config.json.*{message}"):
        load_apet(base, str(tmp_path))
    assert not _apet_layers(base)


def test_numpy_numbers_in_a_config_are_saved_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    config = ApetConfig(num_params=np.int64(600), seed=np.int32(3), pool_factor=np.float32(2.0))
    assert type(config.num_params) is int and type(config.seed) is int and type(config.pool_factor) is float
    model = get_apet_model(tiny_llama(0), config)
    model.save_pretrained(str(tmp_path / "in-place"))
    peft.get_peft_model(tiny_llama(0), ApetConfig(num_params=np.int64(600))).save_pretrained(str(tmp_path / "peft"))
    assert torch.equal(_logits(load_apet(tiny_llama(0), str(tmp_path / "in-place"))), _logits(model))


def test_a_file_given_for_a_folder_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_apet(tiny_llama(0), str(tmp_path / "model.safetensors"))


def test_a_config_file_stripped_of_its_layers_is_refused_by_both_entry_points(tmp_path):
    _peft_model().save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["layers"]
    path.write_text(json.dumps(data))
    for load in (lambda base: peft.PeftModel.from_pretrained(base, str(tmp_path)),
                 lambda base: load_apet(base, str(tmp_path))):
        base = tiny_llama(1)
        with pytest.raises(AdapterFileError, match="lists no layers"):
            load(base)
        assert not _apet_layers(base)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_peft_loads_of_a_damaged_tensor_file_name_it_and_change_nothing(tmp_path, damage):
    _peft_model().save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(100)
    else:
        weights.unlink()
    base = tiny_llama(0)
    before = _logits(base)
    with pytest.raises(AdapterFileError if damage == "truncated" else FileNotFoundError,
                       match="adapter_model.safetensors is (truncated|missing)"):
        peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert not _apet_layers(base) and torch.equal(_logits(base), before)
    model = _peft_model()
    with pytest.raises(ValueError if damage == "truncated" else FileNotFoundError,
                       match="adapter_model.safetensors is (truncated|missing)"):
        model.load_adapter(str(tmp_path), "x")
    assert list(model.peft_config) == ["default"]


def test_switches_bound_before_unload_are_refused_by_name_and_a_disabled_block_spanning_it_exits():
    model = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, modules_to_save=["lm_head"]))
    _randomize(model)
    disable, enable, disable_all = model.disable_adapter, model.enable_adapters, model.disable_adapters
    kept = [lambda: disable().__enter__(), enable, disable_all]
    block = model.disable_adapter()
    block.__enter__()
    base = model.unload()
    block.__exit__(None, None, None)  # (raised AttributeError: the class it called back into was gone)
    assert torch.equal(_logits(base), _logits(tiny_llama(0)))
    for call in kept:
        with pytest.raises(ApetStateError, match="removed by unload"):
            call()


def test_selected_adapters_takes_one_name_as_a_string(tmp_path):
    model = get_apet_model(tiny_llama(0), ApetConfig(num_params=600))
    model.add_adapter(ApetConfig(num_params=100, seed=2), "b")
    model.save_pretrained(str(tmp_path), selected_adapters="default")
    assert list(json.loads((tmp_path / "apet_config.json").read_text())["adapters"]) == ["default"]


def test_two_models_sharing_weight_memory_never_merge_into_each_other():
    """load_state_dict(..., assign=True) from one model into another shares the tensors: a merged layer of one
    would write its W + S into the other's weights (both outputs silently wrong)."""
    first, second = tiny_llama(0), tiny_llama(1)
    second.load_state_dict(first.state_dict(), assign=True)
    get_apet_model(first, ApetConfig(num_params=600, strategy="merged"))
    before = _logits(second)
    for strategy in ("merged", "auto", "unmerged"):  # the other runs merged: refused whatever this one's strategy
        with pytest.raises(ValueError, match="memory is also the weight of another model's APET layer"):
            get_apet_model(second, ApetConfig(num_params=600, strategy=strategy, seed=5))
        assert not _apet_layers(second) and torch.equal(_logits(second), before)
    a, b = tiny_llama(0), tiny_llama(1)
    b.load_state_dict(a.state_dict(), assign=True)
    a = get_apet_model(a, ApetConfig(num_params=600, strategy="unmerged"))
    b = get_apet_model(b, ApetConfig(num_params=600, seed=5))  # auto: unmerged, as over a tied weight
    assert {m.strategy for m in _apet_layers(b)} == {"unmerged"}
    with pytest.raises(RuntimeError, match="cannot merge: weight is shared"):
        _apet_layers(a)[0].merge()
    # two patched merged models: an assign=True load from one into the other is refused before anything changes
    a = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, strategy="merged"))
    b = get_apet_model(tiny_llama(0), ApetConfig(num_params=600, strategy="merged", seed=3))
    _randomize(a, seed=1)
    _randomize(b, seed=2)
    before_a, before_b = _logits(a), _logits(b)
    with pytest.raises(ValueError, match="memory is also the weight"):
        a.load_state_dict(b.state_dict(), assign=True)
    assert torch.equal(_logits(a), before_a) and torch.equal(_logits(b), before_b)


@pytest.mark.parametrize("call, message", [
    (lambda ak: ak.select_indices("ab", 1, method="magnitude", weight=torch.zeros(2, 2)), "2-D weight shape"),
    (lambda ak: ak.select_indices((1, 1), 1, method="magnitude", weight=[[1.0]]), "weight tensor"),
    (lambda ak: ak.magnitude_indices(torch.zeros(3, 4), 2.5), "k must be an int"),
    (lambda ak: ak.magnitude_indices(torch.zeros(12), 2), "2-D float"),
    (lambda ak: ak.magnitude_indices(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]), 1), "NaN"),
    (lambda ak: ak.suggested_lr(1000, method=["random"]), "method must be"),
    (lambda ak: ak.split_budget({"a": ()}, num_params=1), "2-D weight shape"),
    (lambda ak: ak.split_budget({"a": (2, 3, 4)}, num_params=1), "2-D weight shape"),
])
def test_public_helpers_name_a_wrong_argument(call, message):
    import apet_kernels
    with pytest.raises(ValueError, match=message):
        call(apet_kernels)


def test_suggested_lr_reads_an_apet_peft_model():
    from apet_kernels import suggested_lr
    model = peft.get_peft_model(tiny_llama(0), ApetConfig(num_params=600, method="magnitude"))
    assert suggested_lr(model) == suggested_lr(600, "magnitude")


def test_repeated_active_adapters_in_a_config_file_are_named_with_the_file(tmp_path):
    get_apet_model(tiny_llama(0), ApetConfig(num_params=600)).save_pretrained(str(tmp_path))
    path = tmp_path / "apet_config.json"
    data = json.loads(path.read_text())
    data["active_adapters"] = ["default", "default"]
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="apet_config.json: active_adapters must be a list of distinct"):
        load_apet(tiny_llama(0), str(tmp_path))
