"""Worker for tests/test_engines.py: one engine a user reaches for past one GPU, driven the way its docs show, on
this CPU (gloo; DeepSpeed with DS_ACCELERATOR=cpu).

    torchrun --nproc_per_node 2 engines_worker.py ENGINE METHOD BASE OUT

ENGINE: single (one process, the reference), zero2, zero3 (the model built before TrainingArguments), zero3_init
(TrainingArguments first, so from_pretrained partitions the weights under zero.Init, as transformers documents),
zero3_nogather (the same with stage3_gather_16bit_weights_on_model_save false), ddp_accum (DDP with gradient
accumulation),
fsdp2 (Trainer's fsdp_config={"fsdp_version": 2}: accelerate shards every decoder layer), fsdp_size (transformers
shards the model as it loads: DistributedConfig(fsdp_size=2)), single_loop and fsdp_size_loop (the same two in a
hand loop, no Trainer), tp_size_loop (DistributedConfig(tp_size=2)) and tp_torch_loop (torch's parallelize_module),
hand loops where every rank takes the whole batch; zero3_resume and zero3_resume_bf16 (ZeRO-3 under zero.Init with
a checkpoint at step 2 of 4, resumed from APET_RESUME_FROM where it is set).
METHOD: merged, unmerged (APET through get_peft_model), inplace (APET through get_apet_model, strategy "auto") or lora
(PEFT's LoRA, the control). BASE: a saved tiny LLaMA.

Trains STEPS steps on the same global batches in every engine, saves through Trainer and by hand, and writes on rank 0
OUT/result.pt: the losses, each save's tensors, and what a save outside a gather said.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

STEPS, PER_RANK, SEQ = 3, 2, 12


def enable_accelerate_on_cpu() -> None:
    """accelerate runs DeepSpeed and FSDP only over accelerators: on a CPU it counts one process whatever torchrun
    started, and runs DDP where FSDP is asked for. Here (test harness only) its backend choice is given gloo where
    several processes run, and FSDP turns on over them as it would over GPUs."""
    import accelerate.state as state
    from accelerate.utils import DistributedType
    original = state.PartialState._prepare_backend
    if getattr(original, "_apet_cpu", False):
        return

    def prepare(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind
    prepare._apet_cpu = True
    state.PartialState._prepare_backend = prepare
    original_init = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.AcceleratorState.__init__ = init


def examples() -> list[dict]:
    """Taken in order (a sequential sampler): one process takes WORLD x PER_RANK rows per step and the ranks split
    those same rows between them (accelerate's batch sharding)."""
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": row, "labels": row} for row in torch.randint(0, 99, (64, SEQ), generator=gen).tolist()]


def save_base(path: str) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def patched(model, method: str):
    """The model with its adapter, through the method's entry point."""
    from peft import get_peft_model
    from apet_kernels import ApetConfig, get_apet_model
    if method == "inplace":
        return get_apet_model(model, ApetConfig(density=0.05))
    return get_peft_model(model, peft_config(method))


def peft_config(method: str):
    from peft import LoraConfig
    from apet_kernels import ApetConfig
    if method == "lora":
        return LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], init_lora_weights=True)
    return ApetConfig(density=0.05, strategy=method)


def deepspeed_config(stage: int, gather_on_save: bool = True, bf16: bool = False) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # nothing persistent: every weight and every delta partitioned, as on a real model
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=gather_on_save)
    return {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "gradient_clipping": 1.0, "bf16": {"enabled": bf16}}


def arguments(out: str, engine: str, world: int) -> transformers.TrainingArguments:
    engine_args, per_device, steps = {}, PER_RANK * (world if engine == "single" else 1), STEPS
    bf16 = engine.endswith("bf16")
    if engine.startswith("zero"):
        engine_args["deepspeed"] = deepspeed_config(int(engine[4]), gather_on_save=engine != "zero3_nogather")
    if "resume" in engine:  # a DeepSpeed checkpoint half-way, which a second run resumes from
        engine_args.update(save_strategy="steps", save_steps=2)
        steps = 4
    if engine == "ddp_accum":  # the same global batch in 2 micro-batches per rank, under DDP's no_sync
        engine_args["gradient_accumulation_steps"], per_device = 2, PER_RANK // 2
    if engine == "fsdp2":  # transformers' documented FSDP2 setup
        engine_args.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                           "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=per_device, max_steps=steps,
        learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
        report_to=[], seed=0, train_sampling_strategy="sequential", **{"save_strategy": "no", **engine_args})
    if bf16:  # (TrainingArguments refuses bf16 on a CPU; DeepSpeed's own bf16 runs there: turned on in its config)
        args.hf_deepspeed_config.config["bf16"] = {"enabled": True}
    return args


def train(engine: str, method: str, base: str, out: str, world: int = 2) -> dict:
    import apet_kernels  # noqa: F401  (registers APET with PEFT)
    under_init = engine in ("zero3_init", "zero3_nogather") or engine.startswith("zero3_resume")
    if under_init:
        args = arguments(out, engine, world)
        args.device  # the process group first: zero.Init partitions over it
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        assert model.model.layers[0].mlp.up_proj.weight.numel() == 0, "zero.Init did not partition the weights"
    elif engine in ("fsdp_size", "tp_size"):
        args = arguments(out, engine, world)
        args.device  # (the process group the sharding needs)
        size = {f"{engine}": world}
        model = transformers.LlamaForCausalLM.from_pretrained(
            base, distributed_config=transformers.DistributedConfig(**size))
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(0)  # (LoRA's A is drawn here: the same in every engine)
    try:
        model = patched(model, method)
    except ValueError as e:  # (merged over weights sharded already)
        return {"refused": str(e)}
    if not under_init and engine not in ("fsdp_size", "tp_size"):
        args = arguments(out, engine, world)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples())
    trainer.train(resume_from_checkpoint=os.environ.get("APET_RESUME_FROM"))
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], **layout_of(model)}
    trainer.save_model(f"{out}/trainer")
    if engine.startswith("zero3"):
        try:  # outside a gather the deltas are slices: refused, nothing written
            model.save_pretrained(f"{out}/refused", is_main_process=trainer.is_world_process_zero())
        except RuntimeError as e:
            result["refused"] = str(e)
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
            model.save_pretrained(f"{out}/hand", is_main_process=trainer.is_world_process_zero())
    else:
        try:  # (every rank calls it: sharded values are gathered)
            model.save_pretrained(f"{out}/hand", is_main_process=trainer.is_world_process_zero())
        except RuntimeError as e:  # (PEFT's LoRA under FSDP2: "invalid python storage")
            result["hand_error"] = str(e)
    result["wrote_refused"] = os.path.exists(f"{out}/refused/adapter_model.safetensors")
    return result


def layout_of(model) -> dict:
    """What the engine made of the model: the APET layers' strategies and their weights' placements."""
    from apet_kernels import SparseDeltaLinear
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    return {"strategies": sorted({m.strategy for m in layers}),
            "placements": sorted({str(getattr(m.weight, "placements", "plain")) for m in layers}),
            "dtypes": sorted({str(getattr(m.weight, "ds_tensor", m.weight).dtype) for m in layers})}


def parallelize_by_torch(model, world: int):
    """torch's own tensor parallelism (torchtitan's plan for LLaMA): q, k, v, gate and up by rows of the weight
    (ColwiseParallel), o and down by columns (RowwiseParallel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    plan = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
    plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def train_by_hand(engine: str, method: str, base: str, out: str) -> dict:
    """A hand loop (AdamW, no Trainer) on the same global batches: ``single_loop`` in one process, ``fsdp_size_loop``
    on a model transformers shards as it loads (DistributedConfig(fsdp_size=2)), the adapter added after sharding."""
    import torch.distributed as dist
    world, rank = (1, 0) if engine == "single_loop" else (2, int(os.environ["RANK"]))
    if world > 1:
        dist.init_process_group("gloo")
    if engine == "fsdp_size_loop":
        model = transformers.LlamaForCausalLM.from_pretrained(
            base, distributed_config=transformers.DistributedConfig(fsdp_size=world))
    elif engine == "tp_size_loop":
        model = transformers.LlamaForCausalLM.from_pretrained(
            base, distributed_config=transformers.DistributedConfig(tp_size=world))
    elif engine == "tp_torch_loop":
        model = parallelize_by_torch(transformers.LlamaForCausalLM.from_pretrained(base), world)
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(base)
    if engine.startswith("tp_"):  # every rank computes the whole batch: its share of each layer
        world, rank = 1, 0
    torch.manual_seed(0)
    try:
        model = patched(model, method)
    except ValueError as e:  # (merged over weights sharded already)
        return {"refused": str(e)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([e["input_ids"] for e in examples()])
    rows = PER_RANK * 2 // world
    losses = []
    for step in range(STEPS):
        batch = ids[step * PER_RANK * 2 + rank * rows:][:rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    main = not dist.is_initialized() or dist.get_rank() == 0
    model.save_pretrained(f"{out}/hand", is_main_process=main)
    model.save_pretrained(f"{out}/trainer", is_main_process=main)  # (the test reads this name)
    if dist.is_initialized():
        dist.barrier()
    return {"losses": losses, **layout_of(model)}


if __name__ == "__main__":
    engine, method, base, out = sys.argv[1:5]
    enable_accelerate_on_cpu()
    if engine.endswith("_loop"):
        result = train_by_hand(engine, method, base, out)
    else:
        result = train(engine, method, base, out)  # (one process: the 2 ranks' global batches)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, f"{out}/result.pt")
