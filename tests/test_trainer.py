"""Hugging Face Trainer on a patched tiny model (CPU): trains, and resumes exactly from a checkpoint."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from apet_kernels import ApetConfig, get_apet_model  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=12, vocab=99):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(strategy):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return get_apet_model(transformers.LlamaForCausalLM(cfg), ApetConfig(density=0.05, strategy=strategy))


def _trainer(model, out_dir, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
        save_steps=4, logging_steps=1, report_to=[], use_cpu=True, seed=11, data_seed=11, disable_tqdm=True,
        dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=2)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens())


def _deltas(model):
    return {n: m.delta_values.detach().clone() for n, m in model.apet_layers().items()}


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_trainer_trains_and_resumes_exactly(tmp_path, strategy):
    full = _model(strategy)
    before = _deltas(full)
    trainer = _trainer(full, tmp_path / "full", max_steps=8)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    after = _deltas(full)
    assert any(not torch.equal(before[n], after[n]) for n in after)

    resumed = _model(strategy)
    _trainer(resumed, tmp_path / "full", max_steps=8).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    for name, value in _deltas(resumed).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0, msg=f"{name} differs after resume")


def _sizes(folder):
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_checkpoints_hold_the_adapter_not_the_base(tmp_path, strategy):
    from safetensors.torch import load_file

    from apet_kernels import load_apet
    model = _model(strategy)
    _trainer(model, tmp_path, max_steps=4).train()
    ckpt = tmp_path / "checkpoint-4"
    sizes = _sizes(ckpt)
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(k.endswith((".delta_values", ".delta_indices")) for k in saved), sorted(saved)[:5]
    k = sum(m.delta_values.numel() for m in model.apet_layers().values())
    base_bytes = sum(p.numel() * p.element_size() for p in model.base_model.parameters() if not p.requires_grad)
    # deltas and positions (8 B per delta), the adapter (4 B), AdamW's two moments (8 B): a few KB over that
    assert sizes["model.safetensors"] <= 8 * k + 8 * 1024 < base_bytes / 4, (sizes, k, base_bytes)
    state = sizes["model.safetensors"] + sizes["adapter_model.safetensors"] + sizes["optimizer.pt"]
    assert state <= 20 * k + 24 * 1024, (sizes, k)
    # the checkpoint folder is also an adapter folder
    loaded = load_apet(_base_model(), str(ckpt))
    for name, layer in loaded.apet_layers().items():
        torch.testing.assert_close(layer.delta_values, model.apet_layers()[name].delta_values, rtol=0, atol=0)


def _base_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def test_save_model_writes_the_adapter_folder_and_loading_a_checkpoint_reports_nothing_missing(tmp_path):
    from apet_kernels import load_apet
    model = _model("merged")
    trainer = _trainer(model, tmp_path / "run", max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_model.safetensors", "apet_config.json"} <= set(_sizes(tmp_path / "final"))
    ids = torch.randint(3, 99, (2, 8))
    loaded = load_apet(_base_model(), str(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # the Trainer-format state loads as a partial state dict; only what it lacks of the training state is missing
    state = model.checkpoint_state_dict()
    fresh = _model("merged")
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    dropped = dict(state)
    dropped.pop(next(k for k in dropped if k.endswith(".delta_values")))
    assert len(_model("merged").load_state_dict(dropped, strict=False).missing_keys) == 1
    # a plain call still returns the whole model
    assert any(k.endswith("base_layer.weight") for k in model.state_dict())
