"""APET behaves as PEFT's own methods do (issue 41): each defect a PEFT user met, as a test that failed before the
fix, run through both entry points (``get_apet_model`` in place and ``peft.get_peft_model``) wherever both offer the
call. PEFT's own generic suite runs in tests/peft_suite."""

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _helpers import tiny_llama  # noqa: E402
from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model  # noqa: E402

ENTRIES = ["in place", "peft"]
IDS = torch.randint(4, 99, (3, 7), generator=torch.Generator().manual_seed(0))


def _wrap(entry: str, model, config, adapter_name: str = "default"):
    if entry == "in place":
        return get_apet_model(model, config, adapter_name=adapter_name)
    return peft.get_peft_model(model, config, adapter_name=adapter_name).eval()  # (a new PeftModel is in train mode)


def _add(entry: str, model, name: str, config) -> None:
    if entry == "in place":
        model.add_adapter(config, name)  # (transformers' order in place, PEFT's through PEFT)
    else:
        model.add_adapter(name, config)


def _layers(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, SparseDeltaLinear)}


def _values(model, name: str, scale: float = 0.1) -> None:
    """Random values for adapter ``name`` (as if trained)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for layer in _layers(model).values():
            if name in layer.deltas:
                values = layer.deltas[name].values
                values.copy_(torch.randn(values.shape, generator=g) * scale)


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


# ----------------------------------------------------------------------------- adding adapters
@pytest.mark.parametrize("entry", ENTRIES)
def test_adding_an_adapter_leaves_the_others_trainability_as_it_was(entry):
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=400))
    trained = [d.values for m in _layers(model).values() for d in m.deltas.values() if d.k]
    assert trained and all(v.requires_grad for v in trained)
    _add(entry, model, "frozen", ApetConfig(num_params=400, seed=1, inference_mode=True))
    assert all(v.requires_grad for v in trained)  # (the new config's inference mode reached them before)
    new = [m.deltas["frozen"].values for m in _layers(model).values() if m.deltas["frozen"].k]
    assert new and not any(v.requires_grad for v in new)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_a_further_adapter_may_target_layers_the_first_did_not_wrap(entry, method):
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = _wrap(entry, base, ApetConfig(num_params=400, target_modules=["q_proj"]))
    _add(entry, model, "b", ApetConfig(num_params=400, target_modules=["q_proj", "v_proj"], method=method))
    layers = _layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["q_proj", "v_proj"]
    for name, layer in layers.items():  # every layer knows every adapter, K = 0 where it tunes nothing
        assert set(layer.deltas) == {"default", "b"}
        assert (layer.deltas["default"].k > 0) == name.endswith("q_proj") and layer.deltas["b"].k > 0
    if entry == "peft":
        assert model.peft_config["b"].layers.keys() == {n for n in layers}
    _values(model, "b")
    before = _logits(model)
    torch.testing.assert_close(before, _logits(reference), rtol=0, atol=0)  # "default" is zero and active
    model.set_adapter("b")
    assert not torch.allclose(_logits(model), before)
    if method == "magnitude":  # positions of the smallest |W| of the base weight, never of W + S
        for name, layer in layers.items():
            w = reference.get_submodule(name).weight.detach().abs().flatten()
            chosen = w[layer.deltas["b"].indices.long()]
            assert chosen.max() <= w.kthvalue(layer.deltas["b"].k + 1).values


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_config_given_for_a_further_adapter_is_refused_for_gradient_positions_with_a_way_out(entry):
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=400, target_modules=["q_proj"]))
    before = _logits(model)
    with pytest.raises(ValueError, match="method='gradient'"):
        _add(entry, model, "b", ApetConfig(num_params=400, target_modules=["q_proj"], method="gradient"))
    assert torch.equal(_logits(model), before) and all("b" not in m.deltas for m in _layers(model).values())


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_further_adapter_that_fails_half_way_leaves_the_model_as_it_was(entry, monkeypatch):
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=400, target_modules=["q_proj"]))
    _values(model, "default")
    before = _logits(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    real = SparseDeltaLinear.add_adapter

    def fail_on_the_last(layer, name, *args, **kwargs):  # (the new v_proj layers are wrapped by then)
        if layer is list(_layers(model).values())[-1]:
            raise RuntimeError("injected failure")
        return real(layer, name, *args, **kwargs)
    monkeypatch.setattr(SparseDeltaLinear, "add_adapter", fail_on_the_last)
    with pytest.raises(RuntimeError, match="injected failure"):
        _add(entry, model, "b", ApetConfig(num_params=400, target_modules=["q_proj", "v_proj"]))
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(set(m.deltas) == {"default"} for m in _layers(model).values())
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the base model's state dict
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("strategy", ["auto", "unmerged"])
def test_the_state_dict_holds_the_base_weight_after_training(entry, strategy):
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = _wrap(entry, base, ApetConfig(num_params=400, strategy=strategy))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = _logits(model)
    if entry == "peft":
        state = peft.utils.save_and_load.get_base_model_state_dict(model)
    else:
        state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".deltas." not in k}
    assert state.keys() == original.keys()
    for key, value in original.items():  # (merged: W + S was saved, and counted twice when loaded back)
        assert torch.equal(state[key], value), key
    torch.testing.assert_close(_logits(model), trained, rtol=0, atol=0)  # the next forward applies S again


# ----------------------------------------------------------------------------- deleting
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("strategy", ["auto", "unmerged"])
def test_deleting_the_last_adapter_leaves_the_base_model(entry, strategy):
    base = tiny_llama()
    reference = _logits(copy.deepcopy(base))
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = _wrap(entry, base, ApetConfig(num_params=400, strategy=strategy))
    _values(model, "default")
    assert not torch.allclose(_logits(model), reference)
    model.delete_adapter("default")
    assert (model.active_adapters() if entry == "in place" else model.active_adapters) == []
    # (a PeftModel without adapters cannot run its forward, for LoRA too: PEFT looks up the active adapter's
    # config, even in get_base_model(); the wrapped model runs)
    torch.testing.assert_close(_logits(model if entry == "in place" else model.base_model.model), reference,
                               rtol=0, atol=0)
    for name, layer in _layers(model).items():
        assert not layer.deltas and torch.equal(layer.weight, weights[f"{name}.weight"])
    _add(entry, model, "again", ApetConfig(num_params=400, seed=2))
    model.set_adapter("again")
    _values(model, "again")
    assert not torch.allclose(_logits(model), reference)


# ----------------------------------------------------------------------------- merging, as PEFT records it
def test_merge_adapter_is_recorded_and_a_merged_adapter_cannot_be_deleted():
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400, strategy="unmerged"))
    model.add_adapter("b", ApetConfig(num_params=400, seed=1))
    _values(model, "default")
    model.merge_adapter()
    layers = _layers(model).values()
    assert all(m.merged_adapters == ["default"] and m.merged for m in layers)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    assert not any(m.merged for m in layers)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_several_active_adapters_on_auto_layers_run_unmerged_then_merged_again(entry):
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=400))
    _add(entry, model, "b", ApetConfig(num_params=400, seed=1))
    _values(model, "default")
    _values(model, "b")
    switch = (model if entry == "in place" else model.base_model).set_adapter
    alone = {}
    for name in ("default", "b"):
        switch(name)
        alone[name] = _logits(model)
    base = _logits(model, adapter_names=["__base__"] * 3) if entry == "peft" else None
    switch(["default", "b"])
    assert all(m.strategy == "unmerged" for m in _layers(model).values())
    together = _logits(model)
    assert not torch.allclose(together, alone["default"]) and not torch.allclose(together, alone["b"])
    switch("default")
    assert all(m.strategy == "merged" for m in _layers(model).values())
    torch.testing.assert_close(_logits(model), alone["default"])
    if base is not None:
        assert not torch.allclose(base, alone["default"])


# ----------------------------------------------------------------------------- dtypes and meta devices (PEFT's)
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(autocast):
    model = peft.get_peft_model(tiny_llama().to(torch.bfloat16), ApetConfig(num_params=400),
                                autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in model.named_parameters() if ".deltas." in n}
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters() if p.requires_grad)


def test_low_cpu_mem_usage_values_wait_on_the_meta_device_and_a_forward_before_the_load_names_it(tmp_path):
    source = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400))
    _values(source, "default")
    source.save_pretrained(tmp_path)
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in model.named_parameters() if ".deltas." in n} == {"meta"}
    for mode in ("eval", "train"):  # (eval gave the base model's outputs, train failed deep in autograd)
        getattr(model, mode)()
        with pytest.raises(RuntimeError, match="meta device.*low_cpu_mem_usage=True.*load its state dict"):
            model(input_ids=IDS, labels=IDS)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(_logits(loaded), _logits(source))


# ----------------------------------------------------------------------------- mixed-adapter batches
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_mixed_batch_runs_each_rows_adapter_and_modules_to_save(entry):
    # (PEFT adds the classifier to modules_to_save for SEQ_CLS; in place it is named)
    config = ApetConfig(num_params=600, task_type="SEQ_CLS", strategy="unmerged",
                        modules_to_save=None if entry == "peft" else ["classifier"])
    base = _bert()
    reference = _logits(copy.deepcopy(base))
    model = _wrap(entry, base, config)
    if entry == "peft":  # (in place, modules_to_save belong to the model: one trained copy, the base's for __base__)
        _add(entry, model, "b", ApetConfig(num_params=600, task_type="SEQ_CLS", strategy="unmerged", seed=1))
    else:
        _add(entry, model, "b", ApetConfig(num_params=600, strategy="unmerged", seed=1))
    names = ["default", "b"]
    heads = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    with torch.no_grad():
        for p in heads:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(p.shape))))
        if entry == "peft":  # each adapter has its own head there
            model.set_adapter("b")
            for p in [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]:
                p.mul_(-2.0)
            model.set_adapter("default")
    for name in names:
        _values(model, name, scale=0.5)
    alone = {}
    for name in names:
        model.set_adapter(name)
        alone[name] = _logits(model)
    model.set_adapter("default")
    rows = ["b", "default", "__base__"]
    mixed = _logits(model, adapter_names=rows)
    for i, name in enumerate(rows):
        expected = reference[i] if name == "__base__" else alone[name][i]
        torch.testing.assert_close(mixed[i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("how", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}])
def test_generate_with_adapter_names_and_repeated_rows(entry, how):
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=600, strategy="unmerged"))
    _add(entry, model, "b", ApetConfig(num_params=600, strategy="unmerged", seed=1))
    _values(model, "default", 0.5)
    _values(model, "b", 0.5)
    ids = IDS[:2]
    kwargs = dict(max_new_tokens=3, pad_token_id=0, **how)
    outs = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        torch.manual_seed(0)
        outs[name] = model.generate(input_ids=ids, **kwargs)
    torch.manual_seed(0)
    mixed = model.generate(input_ids=ids, adapter_names=["b", "default"], **kwargs)
    per_row = 1 if "num_beams" in how else 2
    assert mixed.shape[0] == 2 * per_row
    if "num_beams" in how:  # (sampling draws in another order)
        torch.testing.assert_close(mixed[0], outs["b"][0], rtol=0, atol=0)
        torch.testing.assert_close(mixed[1], outs["default"][1], rtol=0, atol=0)


@pytest.mark.parametrize("entry", ENTRIES)
def test_mixed_batch_refusals_say_what_peft_says(entry):
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=400, strategy="unmerged"))
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter"):
        _logits(model, adapter_names=["nope", "default", "default"])
    with pytest.raises(ValueError, match=r"adapter_names has 2 names for a batch of 3 rows"):
        _logits(model, adapter_names=["default", "default"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(input_ids=IDS, adapter_names=["default"] * 3)


# ----------------------------------------------------------------------------- loading
def test_load_adapter_into_a_live_adapter_takes_the_folders_positions(tmp_path):
    source = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400, seed=5))
    _values(source, "default")
    source.save_pretrained(tmp_path)
    expected = _logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path))
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400, seed=0))
    model.load_adapter(tmp_path, "default")
    torch.testing.assert_close(_logits(model), expected)  # (0.55 off before: seed-5 values on seed-0 positions)
    assert model.peft_config["default"].seed == 5
    model.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")), expected)


def test_an_adapter_file_holding_base_weights_never_replaces_the_frozen_base(tmp_path):
    from safetensors.torch import load_file, save_file
    source = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400, target_modules=["q_proj"]))
    _values(source, "default")
    source.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.weight"
    tensors[key] = torch.full((32, 32), 7.0)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="base-model weights"):
        model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not (model.base_model.model.model.layers[0].self_attn.q_proj.weight == 7.0).any()
    torch.testing.assert_close(_logits(model), _logits(source))


# ----------------------------------------------------------------------------- FSDP1
@pytest.fixture
def one_gloo_process():
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["auto", "unmerged"])
def test_fsdp1_state_dicts_hold_the_adapter_and_merged_layers_name_fsdp1(one_gloo_process, strategy):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400, strategy=strategy, init_weights=False))
    expected = _logits(model.eval())
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    if strategy == "auto":  # (it named torch.func before)
        with pytest.raises(RuntimeError, match=r"FSDP1 \(FullyShardedDataParallel\).*strategy='unmerged'"):
            _logits(wrapped)
    else:
        torch.testing.assert_close(_logits(wrapped), expected)
    state = peft.get_peft_model_state_dict(wrapped)  # ({} before: FSDP1's module prefix hid every layer)
    assert len(state) == len(_layers(model)) and all(".deltas.values" in k for k in state)
    fresh = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400, strategy=strategy)).eval()
    peft.set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(_logits(fresh), expected)


# ----------------------------------------------------------------------------- reports and refusals
def test_a_peft_models_report_has_the_suggested_rate_and_its_status_names_apet(capsys):
    model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400))
    model.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("trainable params: ") and lines[1].startswith("suggested lr")
    assert model.get_model_status().peft_types == {"default": "APET"}


def test_a_failed_get_peft_model_leaves_the_model_as_it_was():
    model = tiny_llama(tie_word_embeddings=True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: dict(m._load_state_dict_pre_hooks) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="not legal"):
        peft.get_peft_model(model, ApetConfig(num_params=400, strategy="merged", target_modules=["q_proj", "lm_head"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: dict(m._load_state_dict_pre_hooks) for n, m in model.named_modules()} == hooks
    assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())


def test_get_peft_model_refuses_a_model_patched_in_place():
    model = get_apet_model(tiny_llama(), ApetConfig(num_params=400))
    with pytest.raises(RuntimeError, match="patched in place"):
        peft.get_peft_model(model, ApetConfig(num_params=400, seed=1))
    assert all(set(m.deltas) == {"default"} for m in _layers(model).values())


def test_no_warning_of_apet_escapes_a_plain_peft_lifecycle(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.get_peft_model(tiny_llama(), ApetConfig(num_params=400)).eval()
        _values(model, "default")
        model.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not [str(w.message) for w in caught if "apet_kernels" in w.filename]
    torch.testing.assert_close(_logits(loaded), _logits(model))


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("entry", ENTRIES)
def test_unloading_takes_the_load_guards_away(entry, merge):
    """The whole-state-dict check APET gives the modules above its layers goes with the layers: a model given back
    by unload() / merge_and_unload() loads state dicts as a plain model does, with no hook of ours left on it."""
    from apet_kernels import load_guard
    model = _wrap(entry, tiny_llama(), ApetConfig(num_params=300))
    assert any(m.__dict__.get(load_guard._FLAG) for m in model.modules())
    plain = model.merge_and_unload() if merge else model.unload()
    hooks = [h for m in plain.modules() for h in (*m._load_state_dict_pre_hooks.values(),
                                                   *m._load_state_dict_post_hooks.values())
             if getattr(h, "hook", h) in (load_guard._pre_hook, load_guard._post_hook)]
    assert not hooks and not any(m.__dict__.get(load_guard._FLAG) for m in plain.modules())
