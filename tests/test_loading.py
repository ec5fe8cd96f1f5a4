"""Loading never corrupts the base: new base weights, meta-device init, partial and failing loads."""

import pytest
import torch
import torch.nn as nn

from _helpers import BACKENDS, oracle_linear, rel_err, tiny_llama
from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model

transformers = pytest.importorskip("transformers")




def _train_a_step(model):
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model(input_ids=ids)  # merged layers now hold W + S
    return ids


def _assert_state_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(actual[name], t), f"{name} differs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_loading_base_weights_then_unload_gives_the_loaded_checkpoint(backend, strategy):
    model = get_apet_model(tiny_llama(0), ApetConfig(density=0.05, strategy=strategy, backend=backend))
    ids = _train_a_step(model)
    other = tiny_llama(1).state_dict()
    model.load_state_dict(other, strict=False)
    # the tuned deltas now sit on the new base: merged equals unmerged there
    tuned = model(input_ids=ids).logits
    for layer in model.apet_layers().values():
        layer.unmerge()
    assert rel_err(tuned, model(input_ids=ids).logits.double()) <= 1e-5
    _assert_state_equal(model.unload().state_dict(), other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_device_then_to_empty_then_load_gives_the_checkpoint(backend):
    checkpoint = tiny_llama(1).state_dict()
    with torch.device("meta"):
        base = tiny_llama(0)
    model = get_apet_model(base, ApetConfig(density=0.05, backend=backend))
    model.to_empty(device="cpu")
    model.load_state_dict(checkpoint, strict=False)
    layers = model.apet_layers()
    fresh = get_apet_model(tiny_llama(1), ApetConfig(density=0.05, backend=backend)).apet_layers()
    for name, layer in layers.items():
        assert torch.equal(layer.delta_indices, fresh[name].delta_indices), "positions lost on the meta device"
        assert not layer.delta_values.any()
        x = torch.randn(3, layer.in_features)
        assert torch.equal(layer(x), fresh[name](x))  # zero deltas: exactly the loaded linear
    _assert_state_equal(model.unload().state_dict(), {k: v for k, v in checkpoint.items()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_without_base_rebase_on_the_pure_weight(backend):
    torch.manual_seed(0)
    lin = nn.Linear(19, 23)
    pure = lin.weight.detach().clone()
    layer = SparseDeltaLinear.from_linear(lin, k=50, strategy="merged", backend=backend, seed=1)
    layer.delta_values.data.normal_()
    layer(torch.randn(2, 19))  # W holds W + S at the old positions
    donor = SparseDeltaLinear.from_linear(nn.Linear(19, 23), k=50, seed=2)
    donor.delta_values.data.normal_()
    layer.load_state_dict({"delta_indices": donor.delta_indices, "delta_values": donor.delta_values}, strict=False)
    assert torch.equal(layer.delta_base, pure.view(-1)[layer.delta_indices.long()])
    x = torch.randn(5, 19)
    expected, _ = oracle_linear(x, pure, lin.bias, donor.delta_values, donor.delta_indices)
    assert rel_err(layer(x), expected) <= 1e-6
    layer.unmerge()
    assert torch.equal(layer.weight, pure)


@pytest.mark.parametrize("through", ["model", "its backbone"])
def test_failing_load_leaves_every_layer_unchanged(through):
    model = get_apet_model(tiny_llama(0), ApetConfig(density=0.05, method="rows"))
    _train_a_step(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = model if through == "model" else model.model
    state = {k: v.clone() for k, v in target.state_dict().items()}
    names = [k for k in state if k.endswith(".deltas.default.values")]
    for k in names:
        state[k] = torch.randn_like(state[k])
    last_indices = names[-1].replace(".values", ".indices")
    state[last_indices] = state[last_indices].flip(0)  # only the last layer's entry is bad
    with pytest.raises(ValueError, match="unsorted"):
        target.load_state_dict(state)
    _assert_state_equal(model.state_dict(), before)


def test_failing_load_on_a_shape_mismatch_changes_nothing():
    model = get_apet_model(tiny_llama(0), ApetConfig(density=0.05))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn(5, 5)  # the last module in the model
    with pytest.raises(RuntimeError, match="size mismatch for lm_head.weight"):
        model.load_state_dict(state)
    _assert_state_equal(model.state_dict(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerge_is_bit_exact_including_negative_zero(backend):
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.view(-1)[::2] = -0.0
    pure = lin.weight.detach().clone()
    layer = SparseDeltaLinear.from_linear(lin, indices=torch.arange(0, 48, 3, dtype=torch.int32),
                                          strategy="merged", backend=backend)
    layer(torch.randn(2, 8))  # zero deltas merged: cast(-0.0 + 0.0) is +0.0
    layer.unmerge()
    assert torch.equal(layer.weight, pure)
    assert torch.equal(torch.signbit(layer.weight), torch.signbit(pure))


class _Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(16)
        self.fc = SparseDeltaLinear.from_linear(nn.Linear(16, 16), k=20, seed=seed, key=str(seed))


class _Net(nn.Module):
    """A module tree built bottom-up by hand: no get_apet_model anywhere."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Block(0), _Block(1), _Block(2))
        self.head = nn.Linear(16, 4)


@pytest.mark.parametrize("how", ["built bottom-up", "patched in place by replace_linears"])
def test_a_failing_load_changes_nothing_in_any_module_tree(how):
    from apet_kernels import replace_linears
    if how == "built bottom-up":
        net = _Net()
    else:
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
        replace_linears(net, lambda name, m: SparseDeltaLinear.from_linear(m, k=10, key=name))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, SparseDeltaLinear):
                m.delta_values.normal_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in before.items()}
    last = [k for k in state if k.endswith(".indices")][-1]
    state[last] = state[last].flip(0)  # only the last APET layer's entry is bad
    with pytest.raises(ValueError, match="unsorted"):
        net.load_state_dict(state)
    _assert_state_equal(net.state_dict(), before)
    state[last] = state[last].flip(0)
    net.load_state_dict(state)  # the same state, repaired, loads
    for key, t in net.state_dict().items():
        if key.endswith(".values"):
            assert torch.equal(t, state[key]), key


@pytest.mark.parametrize("assign", [True, False])
def test_values_without_positions_into_a_meta_built_model_are_refused(assign):
    """Issue 33: PyTorch's meta-device recipe (build on meta, patch, load_state_dict(..., assign=True)) gave real
    values over positions still on meta: the forward silently returned the base output. Refused before anything
    is assigned, naming the way out; to_empty() first still works (the test above)."""
    donor = get_apet_model(tiny_llama(1), ApetConfig(density=0.05))
    with torch.no_grad():
        for layer in donor.apet_layers().values():
            layer.delta_values.normal_()
    values = {k: v for k, v in donor.state_dict().items() if k.endswith(".values")}
    base = {k.replace(".base_layer.", "."): v for k, v in donor.unload().state_dict().items()}
    with torch.device("meta"):
        base_on_meta = tiny_llama(0)
    model = get_apet_model(base_on_meta, ApetConfig(density=0.05))
    with pytest.raises(ValueError, match=r"positions are on the meta device .*to_empty"):
        model.load_state_dict({**base, **values}, assign=assign, strict=False)
    assert all(p.is_meta for p in model.parameters()), "something was assigned before the refusal"
