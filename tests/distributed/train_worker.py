"""Worker for tests/test_distributed.py: a few AdamW steps on a patched tiny LLaMA.

    torchrun --nproc_per_node 2 train_worker.py ddp OUT STRATEGY
    torchrun --nproc_per_node 2 train_worker.py ddp-regrow OUT STRATEGY      (drop-and-regrow every step)
    accelerate launch --multi_gpu --num_processes 2 train_worker.py accelerate OUT STRATEGY   (CPU ranks)

Each rank writes OUT/rank{R}.safetensors with the delta values it ends with (and, regrowing, its positions). ``train("single", ...)``
is the reference: one process, the whole global batch (the tests call it in their own process).
"""

import os
import sys

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file

from apet_kernels import ApetConfig, get_apet_model

STEPS, GLOBAL_BATCH = 3, 8


def train(mode: str, strategy: str):
    """(the deltas each APET layer ends with, rank, whether this is a multi-process run's rank)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = get_apet_model(transformers.LlamaForCausalLM(cfg).eval(), ApetConfig(density=0.05, strategy=strategy))
    ids = torch.randint(3, 99, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(5))

    rank, world = 0, 1
    accelerator = None
    if mode == "accelerate":  # under `accelerate launch`: accelerate sets up the processes (CPU, gloo)
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        ids = ids.chunk(world)[rank]
    elif mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        ids = ids.chunk(world)[rank]
        if mode not in ("ddp", "ddp-regrow"):
            raise SystemExit(f"unknown mode {mode}")
        model = torch.nn.parallel.DistributedDataParallel(model)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
    regrower = None
    if mode == "ddp-regrow":  # each rank sees its own half of the batch: scores must be summed over the ranks
        from apet_kernels import Regrower
        regrower = Regrower(model.module, opt, interval=1, fraction=0.5, total_steps=STEPS + 1)
    for _ in range(STEPS):
        opt.zero_grad()
        with regrower.observe() if regrower is not None else torch.enable_grad():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward() if accelerator is None else accelerator.backward(loss)
        opt.step()
        if regrower is not None:
            regrower.step()

    inner = model.module if mode.startswith("ddp") else accelerator.unwrap_model(model) if accelerator is not None \
        else model
    values = {}
    for name, layer in inner.apet_layers().items():
        values[name] = layer.delta_values.detach().clone().contiguous()
        if regrower is not None:
            values[name + ".indices"] = layer.delta_indices.clone()
            values[name + ".exp_avg"] = opt.state[layer.delta_values]["exp_avg"].clone()
    return values, rank, accelerator


if __name__ == "__main__":
    mode, out_dir, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
    values, rank, accelerator = train(mode, strategy)
    os.makedirs(out_dir, exist_ok=True)
    save_file(values, os.path.join(out_dir, f"rank{rank}.safetensors"))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    elif mode != "single":
        dist.barrier()
        dist.destroy_process_group()
    # Gloo's worker threads can still hold work objects while the interpreter is torn down and then
    # abort the process ("terminate called without an active exception", about 1 run in 20 here; see
    # pytorch/pytorch#179291). The results are written: leave without interpreter finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
