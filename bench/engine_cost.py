"""APET's step under the engines past one GPU, against the frozen step under the same engine and PEFT LoRA at the same
parameter count: DDP, DeepSpeed ZeRO-2 and ZeRO-3, tensor parallel (FSDP2 has bench/fsdp_cost.py).

    torchrun --nproc_per_node 2 bench/engine_cost.py --engine zero3 --model small --rounds 12   # DS_ACCELERATOR=cpu
    torchrun --nproc_per_node 2 bench/engine_cost.py --engine tp

Every rank builds every method on the same LLaMA preset (bench/compare.py's) and takes one AdamW step of each per
round, interleaved (this machine drifts between runs; ratios from one round do not). DDP and ZeRO give each rank its
own micro-batch; tensor parallel (torch's parallelize_module: q, k, v, gate, up by rows, o, down by columns, before
patching) gives every rank the same one. Rows an engine refuses or crashes on are reported, not timed. Rank 0 writes
``engine_cost_<engine>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_common import environment, interleaved_step_times, markdown_table, ratio_quartiles  # noqa: E402
from compare import budget_of, build_model, model_config  # noqa: E402
from fsdp_cost import norms_only  # noqa: E402
from methods import METHODS  # noqa: E402

# "norms only" (the RMSNorm weights trained, nothing else): the floor where the engine cannot run a frozen step
# (DeepSpeed without an optimizer), and otherwise what any trainable method pays for its collectives and optimizer
ROWS = ("frozen", "norms only", "sparse merged", "sparse unmerged", "lora (peft)")
ENGINES = ("ddp", "zero2", "zero3", "tp")


def parallelize(model) -> None:
    """torch's tensor parallelism on every decoder layer (torchtitan's LLaMA plan), over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
    plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)


def deepspeed_config(stage: int, batch: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # nothing persistent: every weight gathered for its forward and backward, as on a large model
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True}


class Trainee:
    def __init__(self, spec: dict, method: str, engine: str):
        torch.manual_seed(0)
        model = build_model(spec).eval()
        same_batch = engine == "tp"
        gen = torch.Generator().manual_seed(1 + (0 if same_batch else dist.get_rank()))
        self.ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen)
        if engine == "tp":
            parallelize(model)
        make = norms_only if method == "norms only" else METHODS[method]
        self.model, params, self.extra = make(model, spec["k"], backend="native")
        self.trainable = sum(p.numel() for p in params)
        self.model.enable_input_require_grads()  # (every row runs the input-gradient work)
        self.engine = None
        opt = torch.optim.AdamW(params, lr=1e-3) if params else None
        if engine == "ddp" and params:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        elif engine.startswith("zero"):
            import deepspeed
            self.engine, opt, _, _ = deepspeed.initialize(model=self.model, optimizer=opt,
                                                          config=deepspeed_config(int(engine[-1]), spec["batch"]))
            self.model = self.engine
        self.opt = opt

    def step(self) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        if self.engine is not None and self.opt is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            if self.opt is not None:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, choices=ENGINES)
    ap.add_argument("--model", default="small", help="a bench/compare.py preset")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="default bench/runs/engine-cost-<world size>")
    args = ap.parse_args(argv)

    if args.engine.startswith("zero"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    spec = dict(config=model_config(args.model), batch=args.batch, seq=args.seq)
    spec["k"], n_target = budget_of(spec, None, args.density, None)
    out = Path(args.out or HERE / "runs" / f"engine-cost-ws{world}")
    result = dict(environment=environment("cpu"), engine=args.engine, world_size=world, model=args.model,
                  k=spec["k"], target_weights=n_target, batch_per_rank=args.batch, seq=args.seq, rounds=args.rounds)

    trainees, refused = {}, {}
    for m in ROWS:
        try:
            trainees[m] = Trainee(spec, m, args.engine)
            trainees[m].step()  # (a method the engine cannot run fails here, on every rank alike)
        except Exception as e:  # noqa: BLE001  (reported in the table, not timed)
            trainees.pop(m, None)
            refused[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"{m}: {refused[m]}", flush=True)
    times = interleaved_step_times(trainees, args.warmup, args.rounds)
    floor = "frozen" if "frozen" in trainees else "norms only"
    table = []
    for m in ROWS:
        if m in refused:
            table.append(dict(method=m, trainable="", step_ms="", ratio="", note=refused[m]))
            continue
        ratio, q1, q3 = ratio_quartiles(times[m], times[floor])
        table.append(dict(method=m, trainable=trainees[m].trainable, step_ms=round(1e3 * statistics.median(times[m]), 1),
                          ratio=f"{ratio:.3f} ({q1:.3f}–{q3:.3f})",
                          note=f"rank {trainees[m].extra['rank']}" if "rank" in trainees[m].extra else ""))
    result["rows"], result["floor"] = table, floor
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"engine_cost_{args.engine}.json").write_text(json.dumps(result, indent=2))
        lines = [f"# bench/engine_cost.py --engine {args.engine}: {world} ranks on gloo", "",
                 f"{args.model} preset, {n_target:,} target weights, K = {spec['k']:,}, {args.batch}x{args.seq} "
                 f"tokens per rank, {args.rounds} interleaved rounds", "", f"{result['environment']}", "",
                 markdown_table(table, ["method", "trainable", "step_ms", "ratio", "note"],
                                ["method", "trainable", "step ms (median)", f"× {floor} under {args.engine} (q1–q3)",
                                 "note"])]
        (out / f"engine_cost_{args.engine}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
