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


def test_disabling_a_model_patched_in_place_also_gives_back_its_modules_to_save():
    """A fuzz finding (issue 32): disable_apet() / disable_adapters() left trained modules_to_save in the
    'base' output; PEFT's disable_adapter() does not. Inside the block the modules compute with their weights as
    patched, a pending backward still reads the trained ones, and saving inside the block saves the trained."""
    import transformers
    from apet_kernels import ApetConfig, get_apet_model, load_apet

    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
            num_labels=3)).eval()

    ids = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = bert()(input_ids=ids).logits
    model = get_apet_model(bert(), ApetConfig(num_params=600, modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        trained = model(input_ids=ids).logits
    loss = model(input_ids=ids).logits.square().sum()
    with model.disable_apet():
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, base)
        model.save_pretrained(tmp := __import__("tempfile").mkdtemp())
    loss.backward()  # the graph built before the block reads the trained classifier again
    assert model.classifier.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained)
        assert torch.equal(load_apet(bert(), tmp)(input_ids=ids).logits, trained)
        model.disable_adapters()
        assert torch.equal(model(input_ids=ids).logits, base)
        model.enable_adapters()
        assert torch.equal(model(input_ids=ids).logits, trained)
