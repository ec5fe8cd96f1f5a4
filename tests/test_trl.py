"""TRL's trainers on a patched tiny LLaMA (CPU) with their default configs (activation checkpointing on, bf16
autocast on): SFT, DPO (reference log-probabilities from the base with APET disabled, no second model) and
GRPO. Each trains, and its checkpoints hold the adapters only."""

import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from _helpers import sequence_logps as _sequence_logps, small_word_reward as reward, tiny_llama, tiny_tokenizer  # noqa: E402,E501
from apet_kernels import ApetConfig, get_apet_model, load_apet  # noqa: E402


def _model(strategy="merged"):
    base = tiny_llama(0, pad_token_id=0, bos_token_id=1, eos_token_id=2).train()
    return get_apet_model(base, ApetConfig(density=0.05, strategy=strategy))


def _common(tmp_path, steps, **kw):
    return dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                logging_steps=1, save_steps=steps, use_cpu=True, seed=0, disable_tqdm=True, **kw)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_adapter_checkpoint(folder, model):
    from safetensors.torch import load_file
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert saved and all(".deltas." in k for k in saved)
    reloaded = load_apet(tiny_llama(0, pad_token_id=0, bos_token_id=1, eos_token_id=2), str(folder))
    for name, layer in reloaded.apet_layers().items():
        torch.testing.assert_close(layer.delta_values, model.apet_layers()[name].delta_values, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_sft_with_its_default_config(tmp_path, strategy):
    texts = [" ".join(f"w{10 + (i + j) % 4}" for j in range(12)) for i in range(32)]
    model = _model(strategy)
    config = trl.SFTConfig(**_common(tmp_path, 10, learning_rate=5e-2, max_length=16))
    assert config.gradient_checkpointing and config.bf16  # TRL's defaults: what this test is about
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tiny_tokenizer())
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.1, losses
    _assert_adapter_checkpoint(tmp_path / "checkpoint-10", model)


def test_dpo_reference_from_the_base_with_apet_disabled(tmp_path):
    tokenizer = tiny_tokenizer()
    prompts = [" ".join(f"w{(7 * i + j) % 20}" for j in range(6)) for i in range(16)]
    data = datasets.Dataset.from_dict({"prompt": prompts, "chosen": [" w5 w5 w5"] * 16,
                                       "rejected": [" w9 w9 w9"] * 16})
    model = _model()
    with torch.no_grad():  # an adapter trained before (deltas not zero): the reference must not see them
        for layer in model.apet_layers().values():
            layer.delta_values.normal_(0, 0.05)
    config = trl.DPOConfig(**_common(tmp_path, 8, learning_rate=5e-2, precompute_ref_log_probs=True))
    with model.disable_apet():  # the reference log-probabilities are computed in the constructor
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    assert trainer.ref_model is None  # no second copy of the model
    base = tiny_llama(0, pad_token_id=0, bos_token_id=1, eos_token_id=2).eval()
    row = trainer.train_dataset[0]
    expected = _sequence_logps(base, tokenizer, row["prompt"], row["chosen"])
    assert row["ref_chosen_logps"] == pytest.approx(expected, rel=2e-2)  # (TRL computed it in bf16)
    assert abs(_sequence_logps(model.eval(), tokenizer, row["prompt"], row["chosen"]) - expected) > 0.05
    model.train()
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    _assert_adapter_checkpoint(tmp_path / "checkpoint-8", model)


def test_grpo_with_its_default_config(tmp_path):
    prompts = [" ".join(f"w{(3 * i + j) % 20}" for j in range(6)) for i in range(16)]

    model = _model()
    before = {n: m.delta_values.detach().clone() for n, m in model.apet_layers().items()}
    config = trl.GRPOConfig(**_common(tmp_path, 6, learning_rate=1e-1, num_generations=4, max_completion_length=6))
    assert config.gradient_checkpointing and config.bf16 and config.beta == 0.0
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                              processing_class=tiny_tokenizer())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))
    assert any(not torch.equal(before[n], m.delta_values) for n, m in model.apet_layers().items())
    _assert_adapter_checkpoint(tmp_path / "checkpoint-6", model)
