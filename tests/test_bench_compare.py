"""Smoke test of the README's main command on a tiny model: it runs, writes its outputs, and
sparse APET's losses equal dense-mask APET's on the same positions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parent.parent


def test_compare_runs_and_sparse_matches_dense_mask(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "compare.py"), "--model", "tiny", "--rounds", "2", "--warmup", "1",
           "--device", "cpu", "--dtype", "float32", "--density", "0.01", "--backends", "reference",
           "--methods", "frozen", "sparse merged", "sparse unmerged", "dense-mask", "clone-scatter", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"compare.md", "compare.csv", "compare.json", "compare.png"} <= {p.name for p in tmp_path.iterdir()}
    rows = {(r["method"], r["backend"]): r for r in json.loads((tmp_path / "compare.json").read_text())["rows"]}
    dense = rows[("dense-mask", "")]
    for key in [("sparse merged", "reference"), ("sparse unmerged", "reference"), ("clone-scatter", "")]:
        assert rows[key]["max_rel_loss_diff_vs_dense_mask"] < 1e-5, key
        assert rows[key]["state_bytes"] < dense["state_bytes"] / 10
    assert rows[("frozen", "")]["ratio_to_frozen"] == 1.0
    assert "| sparse merged [reference] |" in proc.stdout
