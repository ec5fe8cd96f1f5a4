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
    model.save_apet(tmp_path / "default")
    model.add_adapter("b", ApetConfig(density=0.02, seed=7, target_modules=["q_proj", "v_proj"], strategy=strategy))
    model.set_adapter("b")
    _randomize(model, 2)
    model.save_apet(tmp_path / "b")
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
    load_apet(fresh, folder / "b", adapter_name="b")
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
    with pytest.raises(ValueError, match="seeded positions"):
        model.add_adapter("g", ApetConfig(density=0.01, method="gradient"))
    with pytest.raises(ValueError, match="matches none"):
        model.add_adapter("n", ApetConfig(density=0.01, target_modules=["nothing_like_this"]))
    other = get_apet_model(tiny_llama(hidden_size=48, intermediate_size=40), ApetConfig(density=0.05))
    other.save_apet(tmp_path / "other")
    with pytest.raises(ValueError, match="shape"):
        load_apet(model, tmp_path / "other", adapter_name="other")
    with pytest.raises(ValueError, match="adapter_name= adds an adapter to an ApetModel"):
        load_apet(tiny_llama(), folder / "b", adapter_name="b")
    assert model.adapters == ["b", "default"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.adapters == ["b"]


def test_a_mixed_batch_applies_each_rows_adapter(tmp_path):
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    _randomize(model, 1)
    model.add_adapter("b", ApetConfig(density=0.02, seed=7, target_modules=["q_proj", "v_proj"], strategy="unmerged"))
    model.set_adapter("b")
    _randomize(model, 2)
    model.set_adapter("default")
    ids = torch.randint(0, 99, (4, 9), generator=torch.Generator().manual_seed(3))
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        expected = {}
        for name in ("default", "b"):
            model.set_adapter(name)
            expected[name] = model(ids).logits
        with model.disable_apet():
            expected["__base__"] = model(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-6, msg=f"row {row} ({name})")
    generated = model.generate(ids[:2, :4], adapter_names=["default", "b"], max_new_tokens=2, do_sample=False)
    assert generated.shape == (2, 6)
    assert all(m.mixed_batch is None for m in model.apet_layers().values())  # the context is gone after


def test_a_mixed_batch_needs_unmerged_layers_and_known_names(two_adapters):
    model, _, strategy = two_adapters
    ids = torch.randint(0, 99, (2, 5))
    with pytest.raises(ValueError, match="unknown adapters"):
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
    assert model.active_adapters == ["default", "b"] and model.active_adapter == "default"
    oracle = tiny_llama()
    with torch.no_grad():
        for n, d in dense.items():
            oracle.get_submodule(n).weight += d
    torch.testing.assert_close(_logits(model), _logits(oracle), rtol=1e-5, atol=1e-5)
    # training with both active moves the first one only; the input gradients see both
    b_values = {n: v.clone() for n, (_, v) in ((n, e) for n, e in model._inactive["b"][1].items())}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    assert all(torch.equal(model._inactive["b"][1][n][1], v) for n, v in b_values.items())
    with pytest.raises(ValueError, match="active together"):
        model.merge_and_unload()
    with pytest.raises(RuntimeError, match="applied together"):
        next(iter(model.apet_layers().values())).merge()
    with pytest.raises(ValueError, match="is active"):
        model.delete_adapter("b")
    model.set_adapter("b")  # one again: the extra terms are gone
    assert model.active_adapters == ["b"] and all(m.extra_adapters is None for m in model.apet_layers().values())


def test_adapters_together_need_unmerged_layers():
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    model.add_adapter("b", ApetConfig(density=0.02, seed=7))
    with pytest.raises(ValueError, match="unmerged"):
        model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default"]


def test_a_switch_that_fails_half_way_puts_every_layer_back(two_adapters):
    model, _, _ = two_adapters
    before = _logits(model)
    names = list(model.apet_layers())
    idx, values = model._inactive["default"][1][names[-1]]
    model._inactive["default"][1][names[-1]] = (idx, torch.full_like(values, float("nan")))  # the last layer fails
    with pytest.raises(ValueError, match="adapter values"):
        model.set_adapter("default")
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_a_mixed_batch_that_fails_to_plan_leaves_no_plan_behind(monkeypatch):
    import apet_kernels.hf as hf
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("layout failed")
        return build(*args, **kwargs)
    build = hf.build_layout
    monkeypatch.setattr(hf, "build_layout", failing)
    with pytest.raises(RuntimeError, match="layout failed"):
        model(IDS, adapter_names=["default", "__base__"])
    assert all(m.mixed_batch is None for m in model.apet_layers().values())
