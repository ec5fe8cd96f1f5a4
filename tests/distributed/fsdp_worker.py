"""Worker for tests/test_fsdp.py: one process group, many configurations of FSDP2 (fully_shard) on CPU/gloo.

    torchrun --nproc_per_node N fsdp_worker.py OUT

Runs every configuration of ``CONFIGS`` in turn (one launch per world size: starting processes costs more than
the tiny models train) and writes, on rank 0, OUT/ws{N}.pt: per configuration the per-step losses and the
deltas each APET layer ends with (gathered), plus the checks that only make sense inside the group (unmerge,
saving, DCP resume, regrowth). World size 1 is the reference: the same code, nothing sharded across ranks.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from apet_kernels import ApetConfig, Regrower, SparseDeltaLinear, get_apet_model

STEPS, BATCH, SEQ = 4, 12, 5  # BATCH divides over 1..4 ranks: the mean of the ranks' means is the batch's mean


class Block(nn.Module):
    def __init__(self, i, out_f, strategy, conv1d, checkpoint):
        super().__init__()
        if conv1d:  # GPT-2's Conv1D stores (in, out): FSDP2 shards its input features
            from transformers.pytorch_utils import Conv1D
            linear = Conv1D(out_f, 12)
        else:
            linear = nn.Linear(12, out_f)
        self.fc = SparseDeltaLinear.from_linear(linear, k=20, strategy=strategy, key=str(i))
        self.proj = nn.Linear(out_f, 12).requires_grad_(False)
        self.checkpoint = checkpoint

    def body(self, x):
        return x + self.proj(torch.tanh(self.fc(x)))

    def forward(self, x):
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False)
        return self.body(x)


def tiny_llama(strategy, num_params=None, through_peft=False):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight.view(-1)[::7] = -0.0  # unmerge must give these back
    budget = dict(num_params=num_params) if num_params else dict(density=0.05)
    if through_peft:  # the PEFT entry point: a PeftModel over the same layers (issue 32)
        import peft
        return peft.get_peft_model(base, ApetConfig(**budget, strategy=strategy))
    return get_apet_model(base, ApetConfig(**budget, strategy=strategy))


def build(cfg):
    torch.manual_seed(0)
    if cfg["model"] == "llama":
        return tiny_llama(cfg["strategy"], cfg.get("num_params"), cfg.get("peft", False))
    return nn.Sequential(*(Block(i, cfg["out"], cfg["strategy"], cfg.get("conv1d", False), cfg.get("ckpt", False))
                           for i in range(2)))


def shard(model, cfg, ws):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.get("bf16") \
        else MixedPrecisionPolicy()
    reshard = cfg.get("reshard", True)
    reshard = reshard if not isinstance(reshard, int) or isinstance(reshard, bool) or ws % reshard == 0 and ws > reshard \
        else True  # an int reshards to a smaller group: only where it divides the world size
    inner = model.get_base_model() if cfg.get("peft") else model
    blocks = inner.model.layers if cfg["model"] == "llama" else list(model)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def batch(rank, ws):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, 12, generator=g)
    ids = torch.randint(3, 99, (BATCH, 9), generator=g)
    return x.chunk(ws)[rank], ids.chunk(ws)[rank]


def loss_of(model, cfg, x, ids):
    if cfg["model"] == "llama":
        return model(input_ids=ids, labels=ids).loss
    return model(x).square().mean()


def deltas(model):
    return {n: m.delta_values.full_tensor().detach().clone() if hasattr(m.delta_values, "full_tensor")
            else m.delta_values.detach().clone() for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def train(model, cfg, rank, ws, steps=STEPS, opt=None):
    x, ids = batch(rank, ws)
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, cfg, x, ids)
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(t)  # the mean over the ranks: the whole batch's loss
        losses.append(float(t) / ws)
    return losses, opt


CONFIGS = {}
for strategy in ("merged", "unmerged"):
    for reshard in (True, False, 2):
        CONFIGS[f"mlp10-{strategy}-reshard{reshard}"] = dict(model="mlp", out=10, strategy=strategy, reshard=reshard)
    CONFIGS[f"mlp10-{strategy}-checkpoint"] = dict(model="mlp", out=10, strategy=strategy, ckpt=True)
    CONFIGS[f"conv1d-{strategy}"] = dict(model="mlp", out=10, strategy=strategy, conv1d=True)
    CONFIGS[f"llama-{strategy}"] = dict(model="llama", strategy=strategy)
    # 3 tuned scalars over 14 layers: most layers hold K = 0 (FSDP2 crashed on their empty gradients; issue 33)
    CONFIGS[f"llama-k0-{strategy}"] = dict(model="llama", strategy=strategy, num_params=3)
# the PEFT entry point (issue 32): a PeftModel over the same layers, one strategy each (gloo ranks spin while they
# wait, so every configuration costs a loaded 2-core machine dearly)
CONFIGS["llama-peft-merged"] = dict(model="llama", strategy="merged", peft=True)
CONFIGS["llama-peft-k0-unmerged"] = dict(model="llama", strategy="unmerged", num_params=3, peft=True)
CONFIGS["mlp2-merged"] = dict(model="mlp", out=2, strategy="merged")  # 2 rows over 3 or 4 ranks: empty shards
CONFIGS["mlp10-merged-bf16"] = dict(model="mlp", out=10, strategy="merged", bf16=True)


def checks(rank, ws, out_dir):
    """What happens around training under FSDP2: unmerge, saving, DCP resume, the full state dict, regrowth."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)
    cfg = dict(model="llama", strategy="merged")
    result = {}
    pure = {n: m.weight.detach().clone() for n, m in tiny_llama("merged").apet_layers().items()}
    model = build(cfg)
    shard(model, cfg, ws)
    train(model, cfg, rank, ws)
    # an adapter added (or loaded) after fully_shard would train unreduced: refused, and the model is unchanged
    before = sorted(next(iter(model.apet_layers().values())).adapters)
    try:
        model.add_adapter("late", ApetConfig(density=0.05))
        result["late_adapter"] = "accepted"
    except RuntimeError as exc:
        result["late_adapter"] = str(exc)
    result["late_adapter_left_nothing"] = all(sorted(m.adapters) == before for m in model.apet_layers().values()) \
        and "late" not in model.apet_configs
    # the same through the PEFT entry point (issue 32): PeftModel.add_adapter after fully_shard is refused too
    wrapped = tiny_llama("merged", through_peft=True)
    shard(wrapped, dict(model="llama", peft=True), ws)
    try:
        wrapped.add_adapter("late", ApetConfig(density=0.05))
        result["late_adapter_peft"] = "accepted"
    except RuntimeError as exc:
        result["late_adapter_peft"] = str(exc)
    result["late_adapter_peft_left_nothing"] = "late" not in wrapped.peft_config and all(
        "late" not in m.deltas for m in wrapped.modules() if isinstance(m, SparseDeltaLinear))
    # every rank saves; rank 0 writes
    model.save_pretrained(os.path.join(out_dir, f"saved-ws{ws}"), is_main_process=rank == 0)
    result["saved_deltas"] = deltas(model)
    # the full state dict (a collective): the pure weight and the deltas, loadable by one process
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        result["full_state_weights_pure"] = all(torch.equal(full[f"{n}.base_layer.weight"], pure[n]) for n in pure)
        single = tiny_llama("merged")
        single.load_state_dict(full)
        result["full_state_loads"] = all(torch.equal(m.delta_values, result["saved_deltas"][n])
                                         for n, m in single.apet_layers().items())
    # unmerge on every rank: every shard holds the pure weight again, bit for bit (-0.0 included)
    for layer in model.apet_layers().values():
        layer.unmerge()
    whole = {n: m.base_layer.weight.full_tensor() for n, m in model.apet_layers().items()}
    result["unmerged_bit_exact"] = all(torch.equal(whole[n], pure[n]) and
                                       torch.equal(torch.signbit(whole[n]), torch.signbit(pure[n])) for n in pure)
    # a DCP checkpoint after 2 steps, resumed for 2 more, equals 4 steps straight
    straight = build(cfg)
    shard(straight, cfg, ws)
    train(straight, cfg, rank, ws)
    first = build(cfg)
    shard(first, cfg, ws)
    _, opt = train(first, cfg, rank, ws, steps=2)
    model_state, optim_state = get_state_dict(first, opt)
    path = os.path.join(out_dir, f"dcp-ws{ws}")
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    resumed = build(cfg)
    shard(resumed, cfg, ws)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    model_state, optim_state = get_state_dict(resumed, opt2)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    x, ids = batch(rank, ws)
    for _ in range(2):
        opt2.zero_grad()
        loss_of(resumed, cfg, x, ids).backward()
        opt2.step()
    a, b = deltas(straight), deltas(resumed)
    result["dcp_resume_max_diff"] = max(float((a[n] - b[n]).abs().max()) for n in a)
    # regrowth: every rank ends with the same positions, values and optimizer state
    regrown = build(dict(cfg, strategy="unmerged"))
    shard(regrown, cfg, ws)
    opt3 = torch.optim.AdamW([p for p in regrown.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    regrower = Regrower(regrown, opt3, interval=2, fraction=0.5, total_steps=6)
    x, ids = batch(rank, ws)
    start = {n: m.delta_indices.clone() for n, m in regrown.apet_layers().items()}
    for _ in range(4):
        with regrower.observe():
            loss_of(regrown, cfg, x, ids).backward()
        opt3.step()
        regrower.step()
        opt3.zero_grad()
    mine = torch.cat([m.delta_indices.long() for m in regrown.apet_layers().values()]).float()
    mine = torch.cat([mine, torch.cat(list(deltas(regrown).values()))])
    mine = torch.cat([mine] + [s["exp_avg"].full_tensor() if hasattr(s["exp_avg"], "full_tensor") else s["exp_avg"]
                               for s in (opt3.state[m.delta_values] for m in regrown.apet_layers().values())])
    everyone = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(everyone, mine)
    result["regrowth_moved"] = regrower.moved
    result["regrowth_same_on_every_rank"] = all(torch.equal(everyone[0], e) for e in everyone)
    result["regrowth_positions_moved"] = any(not torch.equal(start[n], m.delta_indices)
                                             for n, m in regrown.apet_layers().items())
    return result


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, cfg in CONFIGS.items():
        model = build(cfg)
        shard(model, cfg, ws)
        losses, _ = train(model, cfg, rank, ws)
        results[name] = {"losses": losses, "deltas": deltas(model)}
    results["checks"] = checks(rank, ws, out_dir)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"ws{ws}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # (gloo's threads may abort a normal interpreter exit; the results are written: see train_worker.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
