"""The scripts PEFT users have, with only the config line changed to ApetConfig (issue 32): transformers' Trainer
(activation checkpointing, bf16, resume, load_best_model_at_end after a regrowth, adapter-only checkpoints), TRL's
SFT, DPO and GRPO trainers with ``peft_config=`` and their default configs, and transformers' own PEFT
integration (``model.add_adapter``, ``load_adapter``, ``disable_adapters``)."""

import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _helpers import PhaseTokens as _Tokens, sequence_logps as _sequence_logps, small_word_reward as reward  # noqa: E402,E501
from _helpers import tiny_llama, tiny_tokenizer  # noqa: E402
from apet_kernels import ApetConfig, SparseDeltaLinear  # noqa: E402
from apet_kernels.trainer import RegrowthCallback  # noqa: E402


def _layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _values(model):
    return {n: m.delta_values.detach().clone() for n, m in _layers(model).items()}


def _peft(strategy="merged"):
    return peft.get_peft_model(tiny_llama(0).train(), ApetConfig(density=0.05, strategy=strategy))


def _args(out_dir, max_steps, **kw):
    base = dict(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-2,
                save_steps=4, logging_steps=1, report_to=[], use_cpu=True, seed=11, data_seed=11, disable_tqdm=True,
                dataloader_num_workers=0, warmup_steps=1, weight_decay=0.0)
    return transformers.TrainingArguments(**{**base, **kw})


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_adapter_only(folder, model):
    """A checkpoint as PEFT writes it for LoRA: adapter_config.json + adapter_model.safetensors, deltas only."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert saved and all(".deltas." in k for k in saved), sorted(saved)[:5]
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    k = sum(m.delta_values.numel() for m in _layers(model).values())
    assert os.path.getsize(os.path.join(folder, "adapter_model.safetensors")) <= 8 * k + 16 * 1024


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_trainer_with_activation_checkpointing_saves_adapter_checkpoints_that_resume_exactly(tmp_path, strategy):
    args = dict(activation_checkpointing=True)
    model = _peft(strategy)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 8, **args), train_dataset=_Tokens())
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    after = _values(model)
    ckpt = tmp_path / "checkpoint-4"
    _assert_adapter_only(ckpt, model)
    resumed = _peft(strategy)
    transformers.Trainer(model=resumed, args=_args(tmp_path, 8, **args), train_dataset=_Tokens()).train(
        resume_from_checkpoint=str(ckpt))
    for name, value in _values(resumed).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "checkpoint-8"))
    for name, value in _values(loaded).items():
        assert torch.equal(value, after[name]), name


def test_trainer_bf16_trains(tmp_path):
    model = _peft()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 6, bf16=True, save_strategy="no"),
                                   train_dataset=_Tokens())
    trainer.train()
    losses = _losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_load_best_model_at_end_after_a_regrowth_gives_the_best_checkpoint(tmp_path, strategy):
    evals = []

    def first_eval_is_best(_):  # the step-2 evaluation scores highest whatever the losses
        evals.append(None)
        return {"marker": -float(len(evals))}

    model = _peft(strategy)
    callback = RegrowthCallback(interval=3, fraction=0.5)
    args = _args(tmp_path, 6, learning_rate=1e-2, eval_strategy="steps", eval_steps=2, save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="marker", greater_is_better=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(8), eval_dataset=_Tokens(8),
                                   compute_metrics=first_eval_is_best, callbacks=[callback])
    trainer.train()
    assert callback.regrower.moved > 0 and trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = peft.PeftModel.from_pretrained(tiny_llama(0), trainer.state.best_model_checkpoint)
    ids = _Tokens(8)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, best(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for name, layer in _layers(model).items():
        assert torch.equal(layer.delta_indices, _layers(best)[name].delta_indices), name


# ----------------------------------------------------------------------------- TRL, with peft_config=
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _base():
    return tiny_llama(0, pad_token_id=0, bos_token_id=1, eos_token_id=2).train()


def _trl_args(tmp_path, steps, **kw):
    return dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                logging_steps=1, save_steps=steps, use_cpu=True, seed=0, disable_tqdm=True, **kw)


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_sft_trainer_with_peft_config(tmp_path, strategy):
    texts = [" ".join(f"w{10 + (i + j) % 4}" for j in range(12)) for i in range(32)]
    config = trl.SFTConfig(**_trl_args(tmp_path, 10, learning_rate=5e-2, max_length=16))
    assert config.gradient_checkpointing and config.bf16  # TRL's defaults: what this test is about
    trainer = trl.SFTTrainer(model=_base(), args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tiny_tokenizer(), peft_config=ApetConfig(density=0.05, strategy=strategy))
    assert isinstance(trainer.model, peft.PeftModel) and _layers(trainer.model)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.1, losses
    _assert_adapter_only(tmp_path / "checkpoint-10", trainer.model)


def test_dpo_trainer_with_peft_config_takes_its_reference_from_the_disabled_adapter(tmp_path):
    tokenizer = tiny_tokenizer()
    prompts = [" ".join(f"w{(7 * i + j) % 20}" for j in range(6)) for i in range(16)]
    data = datasets.Dataset.from_dict({"prompt": prompts, "chosen": [" w5 w5 w5"] * 16,
                                       "rejected": [" w9 w9 w9"] * 16})
    config = trl.DPOConfig(**_trl_args(tmp_path, 8, learning_rate=5e-2))
    trainer = trl.DPOTrainer(model=_base(), args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=ApetConfig(density=0.05))
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled, as for LoRA
    model = trainer.model
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    row = data[0]
    base = _base().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (accelerate left the trained model's forward in bf16 autocast)
        expected = _sequence_logps(base, tokenizer, row["prompt"], row["chosen"])
    model.eval()
    with model.disable_adapter():
        assert _sequence_logps(model, tokenizer, row["prompt"], row["chosen"]) == expected
    assert abs(_sequence_logps(model, tokenizer, row["prompt"], row["chosen"]) - expected) > 0.05
    _assert_adapter_only(tmp_path / "checkpoint-8", model)


def test_grpo_trainer_with_peft_config(tmp_path):
    prompts = [" ".join(f"w{(3 * i + j) % 20}" for j in range(6)) for i in range(16)]

    config = trl.GRPOConfig(**_trl_args(tmp_path, 6, learning_rate=1e-1, num_generations=4, max_completion_length=6))
    assert config.gradient_checkpointing and config.bf16
    trainer = trl.GRPOTrainer(model=_base(), reward_funcs=reward, args=config,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                              processing_class=tiny_tokenizer(), peft_config=ApetConfig(density=0.05))
    before = _values(trainer.model)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))
    assert any(not torch.equal(before[n], v) for n, v in _values(trainer.model).items())
    _assert_adapter_only(tmp_path / "checkpoint-6", trainer.model)


# ----------------------------------------------------------------------------- transformers' PEFT integration
COMPAT_ENV = "APET_COMPAT_TRANSFORMERS"  # a folder holding a transformers that accepts the installed peft (.ci/run)


def _transformers_refuses_this_peft() -> str | None:
    """transformers >= 5.25 refuses peft < 0.22 in its own PEFT integration, even for LoRA: the reason to skip."""
    try:
        tiny_llama().add_adapter(peft.LoraConfig(target_modules=["q_proj"]))
    except (ValueError, ImportError) as exc:
        if "version" in str(exc).lower():
            return f"transformers {transformers.__version__} refuses peft {peft.__version__} for LoRA too: {exc}"
        raise
    return None


def test_transformers_add_adapter_load_adapter_and_disable_adapters(tmp_path):
    reason = _transformers_refuses_this_peft()
    if reason:
        compat = os.environ.get(COMPAT_ENV)
        if not compat:
            pytest.skip(f"{reason}; set {COMPAT_ENV} to a folder holding a transformers that accepts it")
        import subprocess
        import sys
        env = {k: v for k, v in os.environ.items() if k != COMPAT_ENV}
        env["PYTHONPATH"] = os.pathsep.join([compat, os.path.dirname(__file__), env.get("PYTHONPATH", "")])
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                              f"{__file__}::{test_transformers_add_adapter_load_adapter_and_disable_adapters.__name__}"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        return
    ids = _Tokens()[0]["input_ids"][None]
    for i, config in enumerate((ApetConfig(density=0.05), ApetConfig(density=0.05, method="magnitude"))):
        trained = peft.get_peft_model(tiny_llama(0), config)
        with torch.no_grad():
            for layer in _layers(trained).values():
                layer.delta_values.normal_(0, 0.1)
        trained.save_pretrained(tmp_path / str(i))
        model = tiny_llama(0)
        model.load_adapter(str(tmp_path / str(i)))  # transformers' own loader
        for name, layer in _layers(model).items():
            assert torch.equal(layer.delta_indices, _layers(trained)[name].delta_indices), name
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
            model.disable_adapters()
            torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama(0)(input_ids=ids).logits, rtol=0,
                                       atol=0)
            model.enable_adapters()
            torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    fresh = tiny_llama(0)
    fresh.add_adapter(ApetConfig(density=0.05))
    assert len(_layers(fresh)) == 14 and sum(p.numel() for p in fresh.parameters() if p.requires_grad) > 0
