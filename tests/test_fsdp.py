"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU/gloo with 1, 2, 3 and 4 processes, both strategies.

One torchrun launch per world size runs every configuration of tests/distributed/fsdp_worker.py
(reshard_after_forward True / False / 2, activation checkpointing, uneven shards (10 rows over 3 and 4 ranks)
and empty ones (2 rows over 3 and 4), GPT-2's Conv1D, a tiny LLaMA, bf16 parameters with fp32 reductions),
4 AdamW steps each; every configuration must give the losses and deltas of one process training on the
whole batch. Around training, inside the group: saving from every rank, the full state dict, unmerge,
a DCP checkpoint resumed, and regrowth."""

import functools
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
    pytest.skip(f"FSDP2 on CPU/gloo needs torch >= 2.6, this is {torch.__version__}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "distributed" / "fsdp_worker.py"
WORLD_SIZES = (1, 2, 3, 4)


def _worker():
    spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    results = {}
    for ws in WORLD_SIZES:
        # its own session: on a timeout every rank is killed with torchrun (a surviving rank spins in gloo's wait,
        # taking a core from every test after it)
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(ws), "--tee", "3", str(WORKER), str(out)], cwd=out, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        assert proc.returncode == 0, err[-4000:]
        results[ws] = torch.load(out / f"ws{ws}.pt")
    return out, results


@functools.lru_cache(maxsize=None)
def _one_process(name):
    """The configuration trained by one process without FSDP on the whole batch."""
    worker = _worker()
    cfg = worker.CONFIGS[name]
    model = worker.build(cfg)
    losses, _ = worker.train(model, cfg, 0, 1)
    return losses, worker.deltas(model)


def _close(a, b, scale_tol):
    if b.numel() == 0:  # a layer with K = 0
        return a.numel() == 0
    scale = max(float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= scale_tol * scale


@pytest.mark.parametrize("ws", WORLD_SIZES[1:])
def test_every_configuration_trains_as_one_process(runs, ws):
    _, results = runs
    worker = _worker()
    for name, cfg in worker.CONFIGS.items():
        got, ref = results[ws][name], results[1][name]
        # fp32: other reduction orders, amplified by Adam's normalization; bf16 parameters: other batch splits
        tol = 3e-2 if cfg.get("bf16") else 1e-4
        assert all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(got["losses"], ref["losses"])), \
            (name, got["losses"], ref["losses"])
        for layer, value in got["deltas"].items():
            assert _close(value, ref["deltas"][layer], tol), f"{name} ws={ws}: {layer} differs from one rank's run"


@pytest.mark.parametrize("name", [n for n, cfg in _worker().CONFIGS.items() if not cfg.get("bf16")])
def test_one_rank_under_fsdp2_trains_as_a_plain_process(runs, name):
    """World size 1 still frees and re-gathers the weight between forward and backward: it is compared with a
    plain process (no FSDP) here, so the sharded runs above inherit a reference that is right, not only equal."""
    _, results = runs
    losses, deltas = _one_process(name)
    got = results[1][name]
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(got["losses"], losses)), (got["losses"], losses)
    for layer, value in deltas.items():
        assert _close(got["deltas"][layer], value, 1e-4), f"{name}: {layer}"


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_save_state_dict_unmerge_dcp_and_regrowth_inside_the_group(runs, ws):
    out, results = runs
    checks = results[ws]["checks"]
    assert checks["unmerged_bit_exact"]  # every shard holds the pure weight again, -0.0 included
    assert checks["full_state_weights_pure"] and checks["full_state_loads"]
    assert checks["dcp_resume_max_diff"] == 0.0  # a DCP checkpoint + resume equals the uninterrupted run
    assert checks["regrowth_moved"] > 0 and checks["regrowth_positions_moved"]
    assert checks["regrowth_same_on_every_rank"]  # positions, values and AdamW state
    # issue 33: an adapter added after fully_shard trained without gradient reduction (ranks 0.3 apart)
    assert "Add or load adapters before fully_shard" in checks["late_adapter"], checks["late_adapter"]
    assert checks["late_adapter_left_nothing"]
    assert "Add or load adapters before fully_shard" in checks["late_adapter_peft"], checks["late_adapter_peft"]
    assert checks["late_adapter_peft_left_nothing"]
    # every rank called save_pretrained: rank 0 wrote what one process writes for the same deltas
    from apet_kernels import load_apet
    worker = _worker()
    single = load_apet(worker.tiny_llama("merged").unload(), str(out / f"saved-ws{ws}"), strict=True)
    for name, layer in single.apet_layers().items():
        assert torch.equal(layer.delta_values, checks["saved_deltas"][name]), name
    single.save_pretrained(out / f"resaved-ws{ws}")
    for file in ("model.safetensors", "apet_config.json"):
        assert (out / f"resaved-ws{ws}" / file).read_bytes() == (out / f"saved-ws{ws}" / file).read_bytes(), file


def test_fsdp1_refuses_merged():
    """FSDP1 marks the parameters it flattens into one flat parameter, whose shards cannot keep W + S: a merged
    forward refuses, naming the engine (DeepSpeed ZeRO-3 runs merged: tests/test_engines.py)."""
    import torch.nn as nn
    from apet_kernels import SparseDeltaLinear
    for mark, engine in (("_fsdp_flattened", "FSDP1"),):
        layer = SparseDeltaLinear.from_linear(nn.Linear(8, 6), k=5, strategy="merged")
        setattr(layer.weight, mark, True)
        with pytest.raises(RuntimeError, match=engine):
            layer(torch.randn(2, 8))
        layer.unmerge()
        layer(torch.randn(2, 8))  # unmerged runs


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_trainer_with_fsdp2_trains_and_saves_the_adapter(tmp_path, strategy):
    """The documented way (README, Multi-GPU): Trainer with fsdp_config={"fsdp_version": 2}. accelerate turns
    FSDP on only over accelerators, so this runs on GPUs (every one there is, one process each)."""
    worker = Path(__file__).parent / "distributed" / "trainer_fsdp2_worker.py"
    n = torch.cuda.device_count()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           str(worker), str(tmp_path), strategy], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    assert len(result["losses"]) == 4 and result["losses"][-1] < result["losses"][0]
    assert result["values"] and all(v.abs().sum() > 0 for v in result["values"].values())  # trained and saved
    if n == 1:  # one process: the same steps as Trainer without FSDP
        spec = importlib.util.spec_from_file_location("trainer_fsdp2_worker", worker)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        plain, _ = module.train(str(tmp_path / "plain"), strategy, fsdp=False)
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(plain), rtol=1e-4, atol=1e-5)
