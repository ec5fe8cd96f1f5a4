"""Several adapters on one base: add_adapter, load_apet(..., adapter_name=), set_adapter, delete_adapter."""

import pytest
import torch

from _helpers import tiny_llama
from apet_kernels import ApetConfig, get_apet_model, load_apet

IDS = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.apet_layers().values():
            layer.delta_values.copy_(torch.randn(layer.delta_values.shape, generator=g) * 0.1)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(params=["merged", "unmerged"])
def two_adapters(request, tmp_path):
    """A model with adapter "default" (density 5%) and "b" (another seed, 2%, attention only), both
    trained (random values), each also saved alone."""
    strategy = request.param
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy=strategy))
    _randomize(model, 1)
    model.save_apet(tmp_path / "default", selected_adapters=["default"])
    model.add_adapter("b", ApetConfig(density=0.02, seed=7, target_modules=["q_proj", "v_proj"], strategy=strategy))
    model.set_adapter("b")
    _randomize(model, 2)
    model.save_apet(tmp_path / "b", selected_adapters=["b"])
    return model, tmp_path, strategy


def test_switching_gives_each_adapter_alone_exactly(two_adapters):
    model, folder, strategy = two_adapters
    alone = {name: _logits(load_apet(tiny_llama(), folder / name)) for name in ("default", "b")}
    assert model.active_adapter == "b" and model.adapters == ["b", "default"]
    for name in ["default", "b", "default", "b"]:
        model.set_adapter(name)
        torch.testing.assert_close(_logits(model), alone[name], rtol=0, atol=0)
    # the subset adapter tunes only its targets: the other layers apply nothing while it is active
    model.set_adapter("b")
    assert {n for n, m in model.apet_layers().items() if m.delta_indices.numel()} == \
        {n for n in model.apet_layers() if n.endswith(("q_proj", "v_proj"))}


def test_many_switches_then_unload_restore_the_base_bit_exactly(two_adapters):
    model, _, _ = two_adapters
    reference = tiny_llama().state_dict()
    for _ in range(5):
        model.set_adapter("default")
        model.set_adapter("b")
    base = model.unload()
    for name, t in base.state_dict().items():
        assert torch.equal(t, reference[name]), name


def test_a_merged_switch_rewrites_only_the_positions_involved(two_adapters):
    model, _, strategy = two_adapters
    if strategy != "merged":
        pytest.skip("only the merged strategy writes W")
    layer = model.apet_layers()["model.layers.0.self_attn.q_proj"]
    w_b = layer.weight.detach().clone()
    pos_b = layer.delta_indices.long().clone()
    model.set_adapter("default")
    pos_default = layer.delta_indices.long()
    changed = (layer.weight.detach() != w_b).reshape(-1).nonzero().squeeze(1)
    involved = torch.unique(torch.cat([pos_b, pos_default]))
    assert changed.numel() > 0 and torch.isin(changed, involved).all()


def test_only_the_active_adapter_trains_and_the_others_keep_their_values(two_adapters, tmp_path):
    model, folder, _ = two_adapters
    model.set_adapter("default")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    model.save_apet(tmp_path / "default2")
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model), _logits(load_apet(tiny_llama(), folder / "b")), rtol=0, atol=0)


def test_load_apet_adds_a_saved_adapter_under_a_name(two_adapters):
    model, folder, strategy = two_adapters
    fresh = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy=strategy))
    fresh.load_adapter(folder / "b", "b")
    assert fresh.adapters == ["default", "b"]
    fresh.set_adapter("b")
    torch.testing.assert_close(_logits(fresh), _logits(load_apet(tiny_llama(), folder / "b")), rtol=0, atol=0)


def test_bad_calls_name_the_problem_and_change_nothing(two_adapters, tmp_path):
    model, folder, strategy = two_adapters
    before = _logits(model)
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("default", ApetConfig(density=0.01))
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model.set_adapter("c")
    with pytest.raises(ValueError, match="is active"):
        model.delete_adapter("b")
    with pytest.raises(ValueError, match="method='gradient' scores plain linear layers"):
        model.add_adapter("g", ApetConfig(density=0.01, method="gradient"))
    with pytest.raises(ValueError, match="matches no"):
        model.add_adapter("n", ApetConfig(density=0.01, target_modules=["nothing_like_this"]))
    other = get_apet_model(tiny_llama(hidden_size=48, intermediate_size=40), ApetConfig(density=0.05))
    other.save_apet(tmp_path / "other")
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(tmp_path / "other", "other")
    with pytest.raises(ValueError, match="load_adapter"):
        load_apet(model, folder / "b")
    assert model.adapters == ["b", "default"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.adapters == ["b"]


def _assert_rows_follow_their_adapters(model, ids, names):
    """model(ids, adapter_names=names): each row's logits are those of its adapter applied to the whole batch."""
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        alone = {}
        for name in set(names) - {"__base__"}:
            model.set_adapter(name)
            alone[name] = model(ids).logits
        with model.disable_apet():
            alone["__base__"] = model(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-6, msg=f"row {row} ({name})")


def test_a_mixed_batch_applies_each_rows_adapter(tmp_path):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.02, seed=7, target_modules=["q_proj", "v_proj"], strategy="unmerged"))
    model.set_adapter("b")
    _randomize(model, 2)
    model.set_adapter("default")
    ids = torch.randint(0, 99, (4, 9), generator=torch.Generator().manual_seed(3))
    _assert_rows_follow_their_adapters(model, ids, ["b", "default", "__base__", "b"])
    generated = model.generate(ids[:2, :4], adapter_names=["default", "b"], max_new_tokens=2, do_sample=False)
    assert generated.shape == (2, 6)
    assert all(m._mixed is None for m in model.apet_layers().values())  # the context is gone after


def test_a_mixed_batch_needs_unmerged_layers_and_known_names(two_adapters):
    model, _, strategy = two_adapters
    ids = torch.randint(0, 99, (2, 5))
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter"):
        model(ids, adapter_names=["b", "nope"])
    if strategy == "merged":
        with pytest.raises(ValueError, match="runs unmerged"):
            model(ids, adapter_names=["b", "default"])


def test_adapters_active_together_add_their_sparse_terms():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.02, seed=7, strategy="unmerged"))
    model.set_adapter("b")
    _randomize(model, 2)
    dense = {n: m.delta_weight() for n, m in model.apet_layers().items()}
    model.set_adapter("default")
    for n, m in model.apet_layers().items():
        dense[n] += m.delta_weight()
    model.set_adapter(["default", "b"])
    assert model.active_adapters() == ["default", "b"] and model.active_adapter == "default"
    oracle = tiny_llama()
    with torch.no_grad():
        for n, d in dense.items():
            oracle.get_submodule(n).weight += d
    torch.testing.assert_close(_logits(model), _logits(oracle), rtol=1e-5, atol=1e-5)
    # training with both active moves the first one only; the input gradients see both
    layers = model.apet_layers()
    b_values = {n: m.deltas["b"].values.detach().clone() for n, m in layers.items()}
    default_values = {n: m.deltas["default"].values.detach().clone() for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    assert all(torch.equal(m.deltas["b"].values, b_values[n]) for n, m in layers.items())
    assert any(not torch.equal(m.deltas["default"].values, default_values[n]) for n, m in layers.items())
    with pytest.raises(ValueError, match="active together"):
        model.merge_and_unload()
    with pytest.raises(RuntimeError, match="applied together"):
        next(iter(model.apet_layers().values())).merge()
    with pytest.raises(ValueError, match="is active"):
        model.delete_adapter("b")
    model.set_adapter("b")  # one again: the extra terms are gone
    assert model.active_adapters() == ["b"] and all(m.active_adapters == ["b"] for m in model.apet_layers().values())


def test_adapters_together_need_unmerged_layers():
    """An explicit strategy='merged' refuses them; "auto" layers run unmerged while several apply (issue 41)."""
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="merged"))
    model.add_adapter("b", ApetConfig(density=0.02, seed=7))
    with pytest.raises(ValueError, match="unmerged"):
        model.set_adapter(["default", "b"])
    assert model.active_adapters() == ["default"]
    auto = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    auto.add_adapter("b", ApetConfig(density=0.02, seed=7))
    auto.set_adapter(["default", "b"])
    assert auto.active_adapters() == ["default", "b"]
    assert {m.strategy for m in auto.apet_layers().values()} == {"unmerged"}
    auto.set_adapter("b")
    assert {m.strategy for m in auto.apet_layers().values()} == {"merged"}


def test_a_switch_that_fails_half_way_puts_every_layer_back(two_adapters, monkeypatch):
    model, _, _ = two_adapters
    before = _logits(model)
    last = list(model.apet_layers().values())[-1]
    real = type(last).set_adapter

    def fail_once(names):
        if names == ["default"]:
            raise ValueError("injected failure in the last layer")
        real(last, names)
    monkeypatch.setattr(last, "set_adapter", fail_once)
    with pytest.raises(ValueError, match="injected"):
        model.set_adapter("default")
    assert all(m.active_adapter == "b" for m in model.apet_layers().values())
    assert model.active_adapter == "b" and model.active_adapters() == ["b"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_a_mixed_batch_that_fails_to_plan_leaves_no_plan_behind(monkeypatch):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    third = list(model.apet_layers().values())[2]

    def failing(plan):
        raise RuntimeError("plan failed")
    monkeypatch.setattr(third, "begin_mixed_batch", failing)
    with pytest.raises(RuntimeError, match="plan failed"):
        model(IDS, adapter_names=["default", "__base__"])
    assert all(m._mixed is None for m in model.apet_layers().values())
    monkeypatch.undo()
    torch.testing.assert_close(model(IDS, adapter_names=["default", "__base__"]).logits, _logits(model))


def _two_trained_unmerged():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.05, seed=7, strategy="unmerged"))
    model.set_adapter("b")
    _randomize(model, 2)
    model.set_adapter("default")
    return model


@pytest.mark.parametrize("how", [dict(num_beams=3), dict(do_sample=True, num_return_sequences=2, top_k=5)])
def test_generate_with_adapter_names_follows_each_row_through_beams_and_samples(how):
    model = _two_trained_unmerged()
    ids = torch.randint(3, 99, (3, 4), generator=torch.Generator().manual_seed(5))
    names = ["b", "default", "__base__"]
    kwargs = dict(max_new_tokens=3, pad_token_id=0, **how)
    torch.manual_seed(0)
    mixed = model.generate(ids, adapter_names=names, **kwargs)
    expected = []
    for row, name in enumerate(names):  # each row alone, with its adapter applied to the whole (1-row) batch
        torch.manual_seed(0)
        if name == "__base__":
            with model.disable_apet():
                out = model.generate(ids[row:row + 1], **kwargs)
        else:
            model.set_adapter(name)
            out = model.generate(ids[row:row + 1], **kwargs)
        expected.append(out)
    model.set_adapter("default")
    per_row = mixed.shape[0] // len(names)
    for row, out in enumerate(expected):
        if "do_sample" in how:  # sampling draws per batch: compare what the first step's logits say instead
            continue
        assert torch.equal(mixed[row * per_row:(row + 1) * per_row], out), f"row {row} ({names[row]})"
    if "do_sample" in how:  # the logits of the expanded rows are each row's adapter's (checked on a forward)
        with torch.no_grad():
            expanded = ids.repeat_interleave(2, 0)
            with model.mixed_batch(names, expand=True):
                logits = model(expanded).logits
            for row, name in enumerate(names):
                with model.disable_apet() if name == "__base__" else torch.no_grad():
                    if name != "__base__":
                        model.set_adapter(name)
                    alone = model(ids[row:row + 1]).logits
                for r in (2 * row, 2 * row + 1):
                    torch.testing.assert_close(logits[r:r + 1], alone, rtol=1e-5, atol=1e-6)
        model.set_adapter("default")


def test_adapter_names_must_name_every_row():
    model = _two_trained_unmerged()
    ids = torch.randint(3, 99, (3, 4))
    with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
        model(ids, adapter_names=["b", "default"])
    with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
        model.generate(ids, adapter_names=["b", "default"], max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="4 names for a batch of 3 rows"):
        model(ids, adapter_names=["b", "default", "b", "b"])
    assert all(m._mixed is None for m in model.apet_layers().values())
    torch.testing.assert_close(_logits(model), _logits(model))  # still usable


def test_a_mixed_batch_through_a_layer_that_sees_flattened_tokens():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=16, shared_expert_intermediate_size=24)
    base = transformers.Qwen2MoeForCausalLM(cfg).eval()
    model = get_apet_model(base, ApetConfig(density=0.1, strategy="unmerged"))
    assert any("shared_expert." in n for n in model.apet_layers())  # sees hidden_states.view(-1, hidden)
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.1, seed=3, strategy="unmerged"))
    model.set_adapter("b")
    _randomize(model, 2)
    ids = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(1))
    _assert_rows_follow_their_adapters(model, ids, ["default", "b", "__base__"])


def test_a_layer_whose_inputs_cannot_be_mapped_to_rows_is_refused():
    from apet_kernels import SparseDeltaLinear
    model = _two_trained_unmerged()
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, SparseDeltaLinear)
    with model.mixed_batch(["b", "default"]):
        model(torch.randint(3, 99, (2, 5)))  # sets the batch shape
        with pytest.raises(ValueError, match="cannot tell which row"):
            layer(torch.randn(7, 32))  # 7 inputs: routed tokens, not 2 rows of 5


def test_switching_adapters_keeps_every_parameter_and_an_orphaned_optimizer_warns():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    model.add_adapter("small", ApetConfig(density=0.01, seed=3))  # another K
    params = {n: m.delta_values for n, m in model.apet_layers().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.set_adapter("small")
    assert all(not p.requires_grad for p in params.values())
    model(IDS, labels=IDS).loss.backward()
    with pytest.warns(RuntimeWarning, match="nothing is being trained"):
        opt.step()
    model.set_adapter("default")
    assert all(m.delta_values is params[n] and m.delta_values.requires_grad for n, m in model.apet_layers().items())
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    opt.step()  # the same Parameters again: trained
    assert any(not torch.equal(p, before[n]) for n, p in params.items())


def test_a_failed_switch_keeps_every_parameter(two_adapters):
    model, _, _ = two_adapters
    params = {n: m.delta_values for n, m in model.apet_layers().items()}
    with pytest.raises(ValueError):
        model.set_adapter(["b", "b"])
    with pytest.raises(ValueError):
        model.set_adapter("nope")
    assert all(m.delta_values is params[n] for n, m in model.apet_layers().items())


def test_switching_between_a_forward_and_its_backward_is_refused_by_autograd():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.05, seed=7))
    loss = model(IDS, labels=IDS).loss
    model.set_adapter("b")  # W now holds another adapter's W + S
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    model.set_adapter("default")
    model(IDS, labels=IDS).loss.backward()  # a fresh graph is fine


def test_set_adapter_and_friends_inside_a_mixed_batch_are_refused():
    model = _two_trained_unmerged()
    ids = torch.randint(3, 99, (2, 5))
    with torch.no_grad():
        expected = model(ids, adapter_names=["b", "default"]).logits
    with model.mixed_batch(["b", "default"]):
        with pytest.raises(RuntimeError, match="inside a mixed-adapter batch"):
            model.set_adapter("b")
        with pytest.raises(RuntimeError, match="inside a mixed-adapter batch"):
            model.delete_adapter("b")
        with pytest.raises(RuntimeError, match="inside a mixed-adapter batch"):
            model.add_adapter("c", ApetConfig(density=0.01))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_every_adapter_is_module_state():
    model = _two_trained_unmerged()
    state = model.state_dict()
    names = list(model.apet_layers())
    for name in ("default", "b"):
        assert f"{names[0]}.deltas.{name}.values" in state and f"{names[0]}.deltas.{name}.indices" in state
    model.to(torch.float64)
    for layer in model.apet_layers().values():
        assert {d.values.dtype for d in layer.deltas.values()} == {torch.float64}
    model.to(torch.float32)
    clone = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    clone.add_adapter("b", ApetConfig(density=0.05, seed=7, strategy="unmerged"))
    clone.load_state_dict(model.state_dict())
    for name in ("default", "b"):
        model.set_adapter(name)
        clone.set_adapter(name)
        torch.testing.assert_close(_logits(clone), _logits(model), rtol=0, atol=0)


def test_a_full_state_dict_saved_with_another_adapter_active_loads_right():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.05, seed=7))
    model.set_adapter("b")
    _randomize(model, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # W holds W + S of "b"
    other = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    other.add_adapter("b", ApetConfig(density=0.05, seed=7))  # "default" active: its W + S in its weights
    other.load_state_dict(state)
    for name in ("b", "default"):
        model.set_adapter(name)
        other.set_adapter(name)
        torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)
    reference = tiny_llama().state_dict()
    for name, t in other.unload().state_dict().items():
        assert torch.equal(t, reference[name]), name


def test_trainer_checkpoints_keep_the_inactive_adapters(tmp_path):
    import transformers
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    model.add_adapter("b", ApetConfig(density=0.02, seed=7, target_modules=["q_proj"]))
    model.set_adapter("b")
    _randomize(model, 3)
    b_values = {n: m.delta_values.detach().clone() for n, m in model.apet_layers().items()}
    model.set_adapter("default")
    ids = torch.randint(3, 99, (8, 9), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    resumed = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    resumed.add_adapter("b", ApetConfig(density=0.02, seed=7, target_modules=["q_proj"]))
    transformers.Trainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed.set_adapter("b")
    for n, m in resumed.apet_layers().items():
        torch.testing.assert_close(m.delta_values, b_values[n], rtol=0, atol=0)
    loaded = load_apet(tiny_llama(), tmp_path / "checkpoint-2")
    assert loaded.adapters == ["default", "b"]


def test_adapter_names_are_checked_at_every_entry_point(tmp_path):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    for bad in ("", "a.b", "__base__", 3, None):
        with pytest.raises(ValueError, match="adapter names"):
            model.add_adapter(bad, ApetConfig(density=0.01))
    with pytest.raises(ValueError, match="adapter names"):
        get_apet_model(tiny_llama(), ApetConfig(density=0.05), adapter_name="x.y")
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="adapter names"):
        model.load_adapter(tmp_path / "a", "")
    with pytest.raises(TypeError, match="ApetConfig"):
        model.add_adapter("c", {"density": 0.01})
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter"):
        model(IDS, adapter_names="default2")
    assert model.adapters == ["default"]
