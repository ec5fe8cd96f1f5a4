"""disable_apet() nests, survives exceptions, and composes with a pending backward (KL / DPO reference passes)."""

import pytest
import torch

from _helpers import BACKENDS, tiny_llama
from apet_kernels import ApetConfig, get_apet_model

transformers = pytest.importorskip("transformers")


def _model(strategy, backend):
    base = tiny_llama()
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_apet_model(base, ApetConfig(density=0.05, strategy=strategy, backend=backend))
    for layer in model.apet_layers().values():
        layer.delta_values.data.normal_(0, 0.05)
    return model, ids, reference


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_nested_blocks_keep_the_outer_one_disabled(strategy):
    model, ids, reference = _model(strategy, "auto")
    tuned = _logits(model, ids)
    with model.disable_apet():
        with model.disable_apet():
            assert torch.equal(_logits(model, ids), reference)
        assert torch.equal(_logits(model, ids), reference), "leaving the inner block re-enabled the adapter"
    assert torch.equal(_logits(model, ids), tuned)


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_exception_inside_the_block_restores_the_state(strategy):
    model, ids, _ = _model(strategy, "auto")
    tuned = _logits(model, ids)
    with pytest.raises(KeyError):
        with model.disable_apet():
            raise KeyError("inside")
    assert torch.equal(_logits(model, ids), tuned)
    assert not any(m.apet_disabled for m in model.apet_layers().values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("reference_grad", [False, True])
def test_reference_pass_between_forward_and_backward(backend, strategy, reference_grad):
    model, ids, reference = _model(strategy, backend)
    # gradients without a reference pass
    model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: m.delta_values.grad.clone() for n, m in model.apet_layers().items()}
    model.zero_grad(set_to_none=True)
    # the same step with a reference pass in between (DPO reference logits, KL terms)
    loss = model(input_ids=ids, labels=ids).loss
    with model.disable_apet(), torch.set_grad_enabled(reference_grad):
        ref_logits = model(input_ids=ids).logits
    assert torch.equal(ref_logits.detach(), reference)
    loss.backward()
    for name, layer in model.apet_layers().items():
        torch.testing.assert_close(layer.delta_values.grad, expected[name], rtol=1e-5, atol=1e-7)
    if reference_grad:  # the reference pass has its own graph: its input gradient is the base model's
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        with model.disable_apet():
            model(inputs_embeds=emb).logits.square().sum().backward()
        assert all(m.delta_values.grad is not None for m in model.apet_layers().values())
        emb_plain = emb.detach().clone().requires_grad_()
        plain = model.unload()
        plain(inputs_embeds=emb_plain).logits.square().sum().backward()
        torch.testing.assert_close(emb.grad, emb_plain.grad, rtol=1e-5, atol=1e-6)
