"""transformers' Trainer on a patched tiny LLaMA (CPU), configured the ways people train: activation
checkpointing (reentrant and not), gradient accumulation, bf16 autocast, evaluation without label_names,
load_best_model_at_end with save_total_limit, resume, a Trainer subclass with its own _save, accelerate's
save_state / load_state. Checkpoints hold the adapters, never the base."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _helpers import PhaseTokens as _Tokens, tiny_llama  # noqa: E402
from apet_kernels import ApetConfig, get_apet_model, load_apet  # noqa: E402


def _model(strategy="merged", seed=0):
    return get_apet_model(tiny_llama(seed).train(), ApetConfig(density=0.05, strategy=strategy))


def _args(out_dir, max_steps, **kw):
    base = dict(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-2,
                save_steps=4, logging_steps=1, report_to=[], use_cpu=True, seed=11, data_seed=11, disable_tqdm=True,
                dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.0)
    return transformers.TrainingArguments(**{**base, **kw})


def _deltas(model):
    return {n: m.delta_values.detach().clone() for n, m in model.apet_layers().items()}


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_adapter_only(folder, model):
    """The folder holds the adapters' tensors and no frozen weight: a few bytes per delta."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert saved and all(".deltas." in k for k in saved), sorted(saved)[:5]
    k = sum(d.k for m in model.apet_layers().values() for d in m.deltas.values())
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) <= 8 * k + 8 * 1024


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_trains_saves_adapter_only_checkpoints_and_resumes_exactly(tmp_path, strategy):
    model = _model(strategy)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 8), train_dataset=_Tokens())
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    after = _deltas(model)
    ckpt = tmp_path / "checkpoint-4"
    _assert_adapter_only(ckpt, model)
    sizes = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.is_file()}
    # deltas (4 B) and AdamW's two moments (8 B) per delta, plus headers: the base never enters a checkpoint
    k = sum(m.delta_values.numel() for m in model.apet_layers().values())
    assert sizes["model.safetensors"] + sizes["optimizer.pt"] <= 12 * k + 24 * 1024, sizes

    resumed = _model(strategy)
    transformers.Trainer(model=resumed, args=_args(tmp_path, 8), train_dataset=_Tokens()).train(
        resume_from_checkpoint=str(ckpt))
    for name, value in _deltas(resumed).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    # a checkpoint is an APET folder
    loaded = load_apet(tiny_llama(0), str(ckpt))
    assert set(loaded.apet_layers()) == set(model.apet_layers())


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_training(tmp_path, strategy, reentrant):
    runs = {}
    for checkpointing in (False, True):
        model = _model(strategy)
        args = _args(tmp_path / str(checkpointing), 3, save_strategy="no", activation_checkpointing=checkpointing,
                     activation_checkpointing_kwargs={"use_reentrant": reentrant} if checkpointing else None)
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train()
        runs[checkpointing] = _deltas(model)
    assert any(v.abs().sum() > 0 for v in runs[True].values())
    for name, value in runs[True].items():
        torch.testing.assert_close(value, runs[False][name], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    runs = {}
    for batch, accumulate in ((4, 1), (2, 2)):
        model = _model()
        args = _args(tmp_path / str(batch), 3, save_strategy="no", per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulate)
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train()
        runs[batch] = _deltas(model)
    for name, value in runs[2].items():
        torch.testing.assert_close(value, runs[4][name], rtol=1e-4, atol=1e-6)


def test_evaluation_without_label_names_best_model_and_save_total_limit(tmp_path):
    from safetensors.torch import load_file
    model = _model()
    args = _args(tmp_path, 12, eval_strategy="steps", eval_steps=4, save_steps=4, save_total_limit=1,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(8))
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and all(e > 0 for e in evals)  # the loss comes from the labels the model class names
    best = trainer.state.best_model_checkpoint
    assert best is not None and trainer.state.best_metric == min(evals)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert len(kept) <= 2 and os.path.basename(best) in kept  # the best and the last
    saved = load_file(os.path.join(best, "model.safetensors"))
    for name, layer in model.apet_layers().items():  # the model holds the best checkpoint's values again
        torch.testing.assert_close(layer.delta_values, saved[f"{name}.deltas.default.values"], rtol=0, atol=0)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(evals), rel=1e-5)


def test_bf16_autocast_trains(tmp_path):
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 8, bf16=True, save_strategy="no"),
                                   train_dataset=_Tokens())
    trainer.train()
    losses = _losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


class _OwnSave(transformers.Trainer):
    """A subclass that writes checkpoints its own way, as people do: the model's save_pretrained and nothing of
    Trainer's _save."""

    def _save(self, output_dir=None, state_dict=None):
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "note.txt"), "w") as f:
            f.write("saved by _OwnSave")


def test_a_trainer_subclass_with_its_own_save_gets_adapter_checkpoints_that_resume(tmp_path):
    model = _model()
    _OwnSave(model=model, args=_args(tmp_path, 8), train_dataset=_Tokens()).train()
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / "note.txt").exists()
    _assert_adapter_only(ckpt, model)
    resumed = _model()
    _OwnSave(model=resumed, args=_args(tmp_path, 8), train_dataset=_Tokens()).train(resume_from_checkpoint=str(ckpt))
    for name, layer in resumed.apet_layers().items():
        torch.testing.assert_close(layer.delta_values, model.apet_layers()[name].delta_values, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_accelerate_save_state_and_load_state_resume_exactly(tmp_path, strategy):
    from accelerate import Accelerator
    data = _Tokens(16)

    def run(model, steps, first_step=0, save_at=None, load_from=None):
        accelerator = Accelerator(cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        model, opt = accelerator.prepare(model, opt)
        if load_from is not None:
            accelerator.load_state(load_from)
        for step in range(first_step, first_step + steps):
            batch = data[step % len(data)]
            loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            if step + 1 == save_at:
                accelerator.save_state(str(tmp_path / "state"))
        return model

    whole = run(_model(strategy), 6, save_at=3)
    first = _model(strategy)
    with torch.no_grad():  # something to overwrite: the loaded state must replace it
        for layer in first.apet_layers().values():
            layer.delta_values.normal_()
    part = run(first, 3, first_step=3, load_from=str(tmp_path / "state"))
    for name, layer in part.apet_layers().items():
        torch.testing.assert_close(layer.delta_values, whole.apet_layers()[name].delta_values, rtol=0, atol=0)
    # the loaded merged weight is W + S of the loaded values: unmerging gives the pure base back
    for name, layer in part.apet_layers().items():
        layer.unmerge()
        torch.testing.assert_close(layer.weight, tiny_llama(0).get_submodule(name).weight, rtol=0, atol=0)


def test_save_model_writes_an_apet_folder_and_a_training_state_loads_with_nothing_missing(tmp_path):
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "run", 2), train_dataset=_Tokens())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert {"model.safetensors", "apet_config.json"} <= set(os.listdir(tmp_path / "final"))
    _assert_adapter_only(tmp_path / "final", model)
    ids = torch.randint(3, 99, (2, 8))
    loaded = load_apet(tiny_llama(0), str(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "final" / "model.safetensors"))
    result = _model().load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    state.pop(next(k for k in state if k.endswith(".values")))
    assert len(_model().load_state_dict(state, strict=False).missing_keys) == 1
    assert any(k.endswith("base_layer.weight") for k in model.state_dict())  # a plain call: the whole model
