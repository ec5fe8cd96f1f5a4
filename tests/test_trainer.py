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
