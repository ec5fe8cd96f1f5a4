"""A call that fails changes nothing; misuse is refused with an error that names the problem."""

import json
import os

import pytest
import torch
import torch.nn as nn

from _helpers import BACKENDS, tiny_llama
from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model, load_apet
from apet_kernels.layer import ownership as layers_module
import apet_kernels as ak

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()




def _snapshot(model):
    return ({n: t.clone() for n, t in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_unchanged(model, snapshot):
    state, flags, modules = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules, "modules were replaced"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "requires_grad flags changed"
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[n], t) for n, t in state.items()), "weights changed"


def test_failed_get_apet_model_leaves_no_patched_layer_and_every_flag():
    base = _gpt2()
    base.transformer.wpe.weight.requires_grad_(False)  # a flag that freezing would not restore by accident
    before = _snapshot(base)
    # the tied lm_head comes last among the targets: the attention layers before it were patched
    config = ApetConfig(density=0.05, target_modules=["c_attn", "lm_head"], strategy="merged")
    with pytest.raises(ValueError, match="shared"):
        get_apet_model(base, config)
    _assert_unchanged(base, before)
    get_apet_model(base, ApetConfig(density=0.05, target_modules=["c_attn"]))  # and it can be patched again


def test_failure_in_the_middle_of_patching_is_rolled_back(monkeypatch):
    base = tiny_llama()
    before = _snapshot(base)
    real = SparseDeltaLinear.from_linear
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(SparseDeltaLinear, "from_linear", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        get_apet_model(base, ApetConfig(density=0.05))
    monkeypatch.setattr(SparseDeltaLinear, "from_linear", real)
    _assert_unchanged(base, before)
    assert len(get_apet_model(base, ApetConfig(density=0.05)).apet_layers()) == 14  # weights were released


def test_failed_load_apet_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    get_apet_model(tiny_llama(), ApetConfig(density=0.05)).save_apet(str(tmp_path))
    base = tiny_llama()
    before = _snapshot(base)
    real_copy = torch.Tensor.copy_

    def broken_copy(self, *a, **k):  # fails when the loaded values are copied into the patched layers
        if self.requires_grad:
            raise RuntimeError("injected copy failure")
        return real_copy(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "copy_", broken_copy)
        with pytest.raises(RuntimeError, match="injected"):
            load_apet(base, str(tmp_path))
    _assert_unchanged(base, before)


def _tensors_with(path, key_suffix, fill):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith(key_suffix))
    tensors[key] = tensors[key].clone()
    tensors[key][3] = fill
    save_file(tensors, path)
    return key


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_adapter_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path, fill):
    get_apet_model(tiny_llama(), ApetConfig(density=0.05)).save_apet(str(tmp_path))
    key = _tensors_with(str(tmp_path / "model.safetensors"), ".values", fill)
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=rf"{key}.*NaN or Inf"):
        load_apet(base, str(tmp_path))
    _assert_unchanged(base, before)


def test_save_refuses_nan_values_and_writes_nothing(tmp_path):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    layer_name, layer = next(iter(model.apet_layers().items()))
    layer.delta_values.data[0] = float("nan")
    with pytest.raises(ValueError, match=rf"{layer_name}\.deltas\.default\.values holds NaN"):
        model.save_apet(str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == [], "a failed save left files behind"


def test_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    target = tmp_path / "adapter"
    model.save_apet(str(target))
    files = {name: (target / name).read_bytes() for name in os.listdir(target)}
    next(iter(model.apet_layers().values())).delta_values.data.add_(1.0)
    import safetensors.torch

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_apet(str(target))
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == files
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "the staging folder was left behind"


def test_failed_merge_changes_nothing():
    lin = nn.Linear(9, 7)
    layer = SparseDeltaLinear.from_linear(lin, k=10, weight_shared=True)
    layer.delta_values.data.normal_()
    w = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="cannot merge.*shared"):
        layer.merge()
    assert layer.strategy == "unmerged" and torch.equal(lin.weight, w)


# ------------------------------------------------------------------------------------------ misuse
def test_wrapping_a_wrapped_linear_is_refused():
    lin = nn.Linear(9, 7)
    first = SparseDeltaLinear.from_linear(lin, k=5)
    with pytest.raises(ValueError, match="already wrapped by another SparseDeltaLinear"):
        SparseDeltaLinear.from_linear(lin, k=5, seed=1)
    with pytest.raises(TypeError, match="already a SparseDeltaLinear"):
        SparseDeltaLinear.from_linear(first, k=5)
    first.release_weight()
    SparseDeltaLinear.from_linear(lin, k=5)  # once released, it can be wrapped again


def test_wrapper_that_was_garbage_collected_does_not_block():
    lin = nn.Linear(9, 7)
    SparseDeltaLinear.from_linear(lin, k=5)  # dropped at once
    import gc
    gc.collect()
    assert SparseDeltaLinear.from_linear(lin, k=5).weight is lin.weight
    assert sum(1 for r in layers_module._OWNERS.values() if r() is not None) >= 1


@pytest.mark.parametrize("first", ["merge_and_unload", "unload"])
def test_an_unloaded_model_is_its_own_class_again_and_stale_methods_refuse(tmp_path, first):
    from apet_kernels import ApetModel
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    next(iter(model.apet_layers().values())).delta_values.data.normal_()
    save, set_adapter = model.save_apet, model.set_adapter
    stale = (model.unload, model.merge_and_unload, lambda: save(str(tmp_path / "a")),
             lambda: set_adapter("default"))  # bound before unloading
    base = getattr(model, first)()
    assert base is model and type(model) is transformers.LlamaForCausalLM and not isinstance(model, ApetModel)
    assert not hasattr(model, "save_apet") and not hasattr(model, "_apet_patch")
    state = {n: t.clone() for n, t in base.state_dict().items()}
    for call in stale:
        with pytest.raises(RuntimeError, match="removed by unload"):
            call()
    assert not (tmp_path / "a").exists()
    assert all(torch.equal(t, state[n]) for n, t in base.state_dict().items())
    get_apet_model(model, ApetConfig(density=0.05))  # and it can be patched again


def test_adapter_does_not_store_the_backend(tmp_path):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, backend="triton"))
    model.save_apet(str(tmp_path))
    stored = json.loads((tmp_path / "apet_config.json").read_text())
    assert "backend" not in stored
    stored["backend"] = "triton"  # as written by 0.1.0
    (tmp_path / "apet_config.json").write_text(json.dumps(stored))
    loaded = load_apet(tiny_llama(), str(tmp_path))
    assert {m.backend for m in loaded.apet_layers().values()} == {"auto"}
    ids = torch.randint(3, 99, (1, 5))
    loaded(input_ids=ids)
    assert {m.backend for m in load_apet(tiny_llama(), str(tmp_path), backend="reference").apet_layers().values()} \
        == {"reference"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_out_of_range_indices_in_the_buffer_raise_with_validation(backend, strategy, monkeypatch):
    layer = SparseDeltaLinear.from_linear(nn.Linear(9, 7), k=10, strategy=strategy, backend=backend)
    layer.delta_indices[-1] = 10_000  # written straight into the module's buffer
    monkeypatch.setenv("APET_VALIDATE", "1")
    with pytest.raises(ValueError, match="out of range"):
        layer(torch.randn(2, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_moved_in_place_are_caught_by_validation(backend, monkeypatch):
    layer = SparseDeltaLinear.from_linear(nn.Linear(9, 7), indices=torch.tensor([1, 20, 40], dtype=torch.int32),
                                          backend=backend)
    layer.delta_indices.data[1] = 30  # still sorted and in range, but in another row than the layout says
    monkeypatch.setenv("APET_VALIDATE", "1")
    with pytest.raises(ValueError, match="changed in place"):
        layer(torch.randn(2, 9))


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("damage", ["one key missing", "one key unexpected", "deltas only"])
def test_a_failed_strict_load_changes_nothing(strategy, damage):
    """strict=True reports missing and unexpected keys only after copying everything else: the load guard
    refuses the key set first (issue 33: 13 of 14 delta tensors were overwritten before 'Missing key(s)')."""
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy=strategy))
    donor = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy=strategy))
    with torch.no_grad():
        for p in donor.parameters():
            if p.requires_grad:
                p.normal_()
    incoming = dict(donor.state_dict())
    delta_keys = [k for k in incoming if ".deltas." in k]
    if damage == "one key missing":
        del incoming[delta_keys[-1]]
    elif damage == "one key unexpected":
        incoming["model.layers.0.not_a_key"] = torch.zeros(1)
    else:
        incoming = {k: incoming[k] for k in delta_keys}
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="nothing was loaded") as info:
        model.load_state_dict(incoming, strict=True)
    assert ("Missing key" in str(info.value)) == (damage != "one key unexpected")
    _assert_unchanged(model, snapshot)
    model.load_state_dict(dict(donor.state_dict()), strict=True)  # the whole one still loads
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), donor.state_dict().values()))


def test_a_failed_strict_load_into_one_layer_changes_nothing():
    layer = SparseDeltaLinear.from_linear(nn.Linear(8, 6), k=5, strategy="merged")
    sd = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in layer.state_dict().items()}
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    del sd["base_layer.bias"]
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        layer.load_state_dict(sd, strict=True)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    layer.load_state_dict(sd, strict=False)  # what strict=False accepts still loads
    assert torch.equal(layer.delta_values.detach(), sd["deltas.default.values"])


@pytest.mark.parametrize("fields,message", [
    (dict(density=0.1, seed="x"), "seed must be an int, got 'x'"),
    (dict(density=0.1, seed=True), "seed must be an int, got True"),
    (dict(density=0.1, target_modules=3), "target_modules must be a regex string or a list of module names, got 3"),
    (dict(density=0.1, target_modules=["q_proj", 3]), "target_modules must be a regex string"),
    (dict(density=0.1, exclude_modules="["), r"exclude_modules '\[' is not a valid regular expression"),
    (dict(density=0.1, pool_factor=-1), "pool_factor must be a number >= 1"),
    (dict(density=0.1, pool_factor=float("nan")), "pool_factor must be a number >= 1"),
    (dict(num_params=True), "num_params must be a non-negative int, got True"),
    (dict(density="0.1"), "density must be a number in"),
    (dict(budget_like=8), "budget_like must be a string"),
    (dict(density=0.1, modules_to_save="lm_head"), "modules_to_save must be a list of module names"),
])
def test_config_fields_of_the_wrong_type_or_range_are_refused_by_name(fields, message):
    """Issue 33: these were accepted (pool_factor=-1, num_params=True) or failed deep inside with an error that
    named no field (seed='x': "invalid literal for int()", target_modules=3: "'int' object is not iterable",
    exclude_modules='[': a bare re.error)."""
    with pytest.raises(ValueError, match=message):
        ApetConfig(**fields)


def test_unload_after_resizing_a_module_to_save_refuses_before_changing_anything():
    """Issue 33: unload() raised a size mismatch after swapping out every APET layer, left the class patched,
    and every later unload() failed the same way."""
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, modules_to_save=["lm_head"]))
    model.resize_token_embeddings(model.config.vocab_size + 11)
    layers = model.apet_layers()
    snapshot = _snapshot(model)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"lm_head.weight as patched .*resize_token_embeddings.*Nothing was"):
            model.unload()
        _assert_unchanged(model, snapshot)
        assert model.apet_layers().keys() == layers.keys()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()  # the way out it names
        assert not hasattr(merged, "apet_layers")
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda: ak.select_indices("ab", 3), r"2-D weight shape \(out, in\) of ints, got 'ab'"),
    (lambda: ak.select_indices((4.5, 4), 3), "2-D weight shape"),
    (lambda: ak.select_indices((4, 4), 3, seed="x"), "seed must be an int, got 'x'"),
    (lambda: ak.select_indices((4, 4), 3, key=5), "key must be a string"),
    (lambda: ak.split_budget([(4, 4)], num_params=3), "shapes must map names to weight shapes"),
    (lambda: ak.split_budget({"a": "4x4"}, num_params=3), r"shapes\['a'\] must be a 2-D weight shape"),
    (lambda: ak.split_budget({"a": (4, 4)}, density=True), "density must be a number in"),
    (lambda: ak.suggested_lr(-5), "positive int"),
    (lambda: ak.suggested_lr(0), "positive int"),
    (lambda: ak.suggested_lr(True), "positive int"),
    (lambda: ak.suggested_lr("x"), "positive int"),
])
def test_public_helpers_refuse_wrong_arguments_by_name(call, message):
    """Issue 33: select_indices('ab', 3) and seed='x' said "invalid literal for int()", key=5 and
    suggested_lr(-5) / (0) / (True) were accepted, split_budget([...]) raised an AttributeError."""
    with pytest.raises(ValueError, match=message):
        call()


def test_a_load_another_librarys_hook_breaks_off_does_not_keep_the_model_alive():
    """APET's load check records the load in progress until its post-hook; a load broken off by a hook of another
    library never reaches that hook, and the record must not hold the model (a whole model leaked per such load)."""
    import gc
    import weakref

    model = get_apet_model(tiny_llama(), ApetConfig(num_params=300))
    state = model.state_dict()

    def foreign(*args, **kwargs):
        raise RuntimeError("another library refuses this load")
    model.model.layers[1].register_load_state_dict_pre_hook(foreign)
    with pytest.raises(RuntimeError, match="another library"):
        model.load_state_dict(state)
    alive = weakref.ref(model)
    del model, state
    gc.collect()
    assert alive() is None, "the interrupted load's record still holds the model"
