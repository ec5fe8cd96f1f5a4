"""APET under FSDP2 (``fully_shard``): the step's cost against the frozen FSDP2 step and PEFT LoRA at the same
parameter count, and the bytes APET keeps on each rank against that rank's shard of the weights.

    torchrun --nproc_per_node 2 bench/fsdp_cost.py --model small --rounds 8     # CPU: gloo, one thread per rank
    torchrun --nproc_per_node 8 bench/fsdp_cost.py --memory-only                # the per-rank bytes at 8 ranks

Every rank builds every method on the same LLaMA preset (bench/compare.py's), shards each decoder layer and
then the root with ``fully_shard`` (reshard_after_forward=True, Trainer's default), and takes one AdamW step
of each method per round, interleaved (this machine drifts between runs; ratios from one round do not).
Rank 0 writes ``fsdp_cost.json`` and ``fsdp_cost.md`` into ``--out``.
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
from torch.distributed.fsdp import fully_shard  # noqa: E402

from bench_common import environment, interleaved_step_times, markdown_table, ratio_quartiles  # noqa: E402
from compare import budget_of, build_model, model_config  # noqa: E402
from methods import METHODS  # noqa: E402

# "norms only": the RMSNorm weights trained, nothing else: the gradient collectives and optimizer step any
# trainable method pays under FSDP2 (the frozen step runs neither), without any adapter's compute
ROWS = ("frozen", "norms only", "sparse merged", "sparse unmerged", "lora (peft)")


def norms_only(model, k, **_):
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name.rsplit(".", 2)[-2])
    return model, [p for p in model.parameters() if p.requires_grad], {}


def shard(model) -> None:
    """fully_shard every decoder layer, then the root (what accelerate's FSDP2 plugin does by layer class)."""
    for module in list(model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)


class Trainee:
    def __init__(self, spec: dict, method: str):
        torch.manual_seed(0)
        model = build_model(spec).eval()
        gen = torch.Generator().manual_seed(1 + dist.get_rank())  # each rank its own micro-batch
        self.ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen)
        make = norms_only if method == "norms only" else METHODS[method]
        self.model, params, self.extra = make(model, spec["k"], backend="native")
        self.trainable = sum(p.numel() for p in params)
        # every row does the input-gradient work (the frozen floor has nothing else to run a backward for);
        # transformers' hook on the embeddings' output, as Trainer sets it for checkpointing
        self.model.enable_input_require_grads()
        shard(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]  # (the sharded Parameters)
        self.opt = torch.optim.AdamW(params, lr=1e-3) if params else None

    def step(self) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - t0


def profile_step(trainee: Trainee) -> str:
    """One step under torch.profiler: the ops that took the most time on this rank (collectives included)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainee.step()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def apet_bytes_per_rank(model) -> dict:
    """On this rank, over the APET layers: the local shard of the frozen weights, the deltas' values (sharded
    Parameters) and what is replicated (indices, bases, flags, the index layouts)."""
    from apet_kernels import SparseDeltaLinear
    shard_b = values_b = replicated_b = k = 0
    for m in model.modules():
        if not isinstance(m, SparseDeltaLinear):
            continue
        shard_b += local_bytes(m.base_layer.weight)
        for delta in m.deltas.values():
            k += delta.k
            values_b += local_bytes(delta.values)
            replicated_b += sum(local_bytes(b) for b in delta.buffers())  # (the layouts are buffers too)
    return dict(k=k, weight_shard_bytes=shard_b, values_bytes=values_b, replicated_bytes=replicated_b,
                replicated_over_shard=replicated_b / max(shard_b, 1),
                replicated_bytes_per_delta=replicated_b / max(k, 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="a bench/compare.py preset")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory-only", action="store_true", help="only the per-rank bytes of sparse merged")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each method (rank 0's ops)")
    ap.add_argument("--out", default=None, help="default bench/runs/fsdp-cost-<world size>")
    args = ap.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.set_default_dtype(getattr(torch, args.dtype))
    spec = dict(config=model_config(args.model), batch=args.batch, seq=args.seq)
    spec["k"], n_target = budget_of(spec, None, args.density, None)
    out = Path(args.out or HERE / "runs" / f"fsdp-cost-ws{world}")
    result = dict(environment=environment("cpu"), world_size=world, model=args.model, dtype=args.dtype,
                  k=spec["k"], target_weights=n_target, batch_per_rank=args.batch, seq=args.seq)

    rows = ("sparse merged",) if args.memory_only else ROWS
    trainees = {m: Trainee(spec, m) for m in rows}
    memory = apet_bytes_per_rank(trainees["sparse merged"].model)
    gathered = [None] * world
    dist.all_gather_object(gathered, memory)
    result["memory_per_rank"] = gathered
    if not args.memory_only:
        times = interleaved_step_times(trainees, args.warmup, args.rounds)
        table = []
        for m in rows:
            ratio, q1, q3 = ratio_quartiles(times[m], times["frozen"])
            table.append(dict(method=m, trainable=trainees[m].trainable, step_ms=1e3 * statistics.median(times[m]),
                              ratio=ratio, q1=q1, q3=q3,
                              note=f"rank {trainees[m].extra['rank']}" if "rank" in trainees[m].extra else ""))
        result["rows"] = table
        if args.profile:
            result["profiles"] = {m: profile_step(t) for m, t in trainees.items()}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp_cost.json").write_text(json.dumps(result, indent=2))
        lines = [f"# bench/fsdp_cost.py: FSDP2 on gloo, {world} ranks", "",
                 f"{args.model} preset, {n_target:,} target weights, K = {spec['k']:,}, {args.batch}x{args.seq} "
                 f"tokens per rank, {args.dtype}", "", f"{result['environment']}", ""]
        if "rows" in result:
            lines += [markdown_table([dict(r, ratio=f"{r['ratio']:.3f} ({r['q1']:.3f}–{r['q3']:.3f})") for r in
                                      result["rows"]], ["method", "trainable", "step_ms", "ratio", "note"],
                                     ["method", "trainable", "step ms (median)", "× frozen FSDP2 (q1–q3)", "note"]), ""]
        mem = result["memory_per_rank"]
        lines += ["APET bytes per rank (sparse merged):", "",
                  markdown_table([dict(rank=i, **m) for i, m in enumerate(mem)],
                                 ["rank", "k", "weight_shard_bytes", "values_bytes", "replicated_bytes",
                                  "replicated_over_shard", "replicated_bytes_per_delta"])]
        for m, table in result.get("profiles", {}).items():
            lines += ["", f"## one step of {m} under torch.profiler (rank 0)", "", "```", table, "```"]
        (out / "fsdp_cost.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
