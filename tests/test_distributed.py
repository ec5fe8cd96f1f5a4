"""DDP and accelerate launch with the existing engines (torchrun, gloo, CPU); FSDP2 has tests/test_fsdp.py."""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    return proc


def _torchrun(mode, out, strategy, tmp_path):
    # --tee 3: each rank's own stdout/stderr appear (prefixed) in torchrun's, so a failing rank's
    # traceback is in the failure message rather than only torchrun's summary
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
                 str(WORKER), mode, str(out), strategy], tmp_path)


def _failure(proc) -> str:
    lines = proc.stderr.splitlines()
    causes = [ln for ln in lines if any(w in ln for w in ("Error", "error", "terminate", "Abort", "what()"))]
    return "\n".join(causes[:40]) + "\n...\n" + proc.stderr[-2000:]


@functools.lru_cache(maxsize=None)
def _single(strategy):
    """The reference, one process on the whole batch: the worker's own training, run here once per strategy
    for every test (a subprocess each cost seconds of startup)."""
    spec = importlib.util.spec_from_file_location("train_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    values, _, _ = worker.train("single", strategy)
    return values


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_ddp_matches_single_process(tmp_path, strategy):
    proc = _torchrun("ddp", tmp_path / "ddp", strategy, tmp_path)
    assert proc.returncode == 0, _failure(proc)
    _assert_ranks_match_single(tmp_path / "ddp", strategy, tmp_path)


def _assert_ranks_match_single(folder, strategy, tmp_path):
    """Both ranks end with the same deltas, and with those of one process on the whole batch."""
    r0, r1 = (load_file(str(folder / f"rank{r}.safetensors")) for r in (0, 1))
    single = _single(strategy)
    assert r0.keys() == single.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs across ranks"
        torch.testing.assert_close(r0[name], single[name], rtol=1e-4, atol=1e-6, msg=f"{name} vs single process")
    assert any(v.abs().sum() > 0 for v in r0.values())


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_regrowth_under_ddp_leaves_every_rank_the_same(tmp_path, strategy):
    """Each rank observes its own half of the batch: the regrower sums the candidates' scores over the ranks,
    so every rank moves the same deltas to the same positions (before: each its own, silently)."""
    proc = _torchrun("ddp-regrow", tmp_path / "regrow", strategy, tmp_path)
    assert proc.returncode == 0, _failure(proc)
    r0, r1 = (load_file(str(tmp_path / "regrow" / f"rank{r}.safetensors")) for r in (0, 1))
    moved = [k for k in r0 if k.endswith(".indices") and not torch.equal(r0[k], _single_indices(k))]
    assert moved, "no position moved"
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs across ranks"


def _single_indices(key):
    from apet_kernels import ApetConfig, get_apet_model
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = get_apet_model(transformers.LlamaForCausalLM(cfg), ApetConfig(density=0.05))
    return model.apet_layers()[key[:-len(".indices")]].delta_indices


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_accelerate_launch_matches_single_process(tmp_path, strategy):
    """`accelerate launch` with 2 CPU processes trains a patched model as one process does. (accelerate's
    `--cpu` alone starts one process and its multi-CPU mode needs mpirun; `--multi_gpu` starts the processes
    through torch.distributed.run, and Accelerator(cpu=True) in the worker makes them CPU/gloo ranks.)"""
    pytest.importorskip("accelerate")
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER),
                 "accelerate", str(tmp_path / "acc"), strategy], tmp_path)
    assert proc.returncode == 0, _failure(proc)
    _assert_ranks_match_single(tmp_path / "acc", strategy, tmp_path)
