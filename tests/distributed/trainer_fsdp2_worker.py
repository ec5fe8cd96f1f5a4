"""Worker for tests/test_fsdp.py's GPU test: transformers' Trainer with FSDP2 (``fsdp_version: 2``), the documented way.

    torchrun --nproc_per_node N trainer_fsdp2_worker.py OUT STRATEGY

Trains a tiny patched LLaMA for a few steps with Trainer's FSDP2 path (accelerate wraps every decoder layer
with fully_shard), saves through Trainer, and writes on rank 0 OUT/result.pt: the losses, the saved adapter's
values and the same steps trained without FSDP in the same process (rank 0 only, after the group is done).
"""

import sys

import torch
import transformers

from apet_kernels import ApetConfig, get_apet_model, load_apet

STEPS = 4


def model(strategy):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return get_apet_model(transformers.LlamaForCausalLM(cfg), ApetConfig(density=0.05, strategy=strategy))


def data():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 99, (16, 12), generator=gen)
    # a list of examples, which Trainer takes as a map-style dataset: no `datasets` (the lent GPU image lacks it)
    return [{"input_ids": row, "labels": row} for row in ids.tolist()]


def train(out, strategy, fsdp):
    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_drop_last=True,
        **(dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                "reshard_after_forward": True}) if fsdp else {}))
    trainer = transformers.Trainer(model=model(strategy), args=args, train_dataset=data())
    trainer.train()
    trainer.save_model(out)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


if __name__ == "__main__":
    out, strategy = sys.argv[1], sys.argv[2]
    losses, trainer = train(out, strategy, fsdp=True)
    if trainer.is_world_process_zero():
        reloaded = load_apet(model(strategy), out)
        values = {n: m.delta_values.detach().cpu() for n, m in reloaded.apet_layers().items()}
        torch.save(dict(losses=losses, values=values, world_size=trainer.args.world_size), f"{out}/result.pt")
