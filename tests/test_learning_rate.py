"""suggested_lr: the study's rates by scheme and budget, the line printed with the trainable parameters, and the
warning when magnitude or gradient positions train at a rate the study found them to bear badly."""

import warnings

import pytest
import torch

from _helpers import tiny_llama
from apet_kernels import ApetConfig, get_apet_model, suggested_lr
from apet_kernels import learning_rate

transformers = pytest.importorskip("transformers")


def test_the_measured_points_come_back_and_the_rate_falls_with_k():
    for scheme, points in learning_rate.MEASURED.items():
        for k, lr in points:
            assert suggested_lr(int(k), scheme) == pytest.approx(lr)
    ks = [10, 1e3, 1e4, 5e4, 3.3e5, 1e6, 1e8, 1e11]
    for method in ("random", "rows", "magnitude", "gradient"):
        rates = [suggested_lr(int(k), method) for k in ks]
        assert all(a >= b for a, b in zip(rates, rates[1:])), (method, rates)
        assert all(learning_rate.LR_RANGE[0] <= r <= learning_rate.LR_RANGE[1] for r in rates)
    # data-chosen positions never run hotter than random ones at the same K
    for k in ks:
        assert suggested_lr(int(k), "gradient") <= suggested_lr(int(k), "magnitude") <= suggested_lr(int(k))
    assert suggested_lr(20_000, "rows") == suggested_lr(20_000, "random")
    with pytest.raises(ValueError, match="no suggested learning rate for method 'lora'"):
        suggested_lr(100, "lora")


def test_suggested_lr_of_a_patched_model_and_the_printed_line(capsys):
    model = get_apet_model(tiny_llama(), ApetConfig(num_params=3000, method="magnitude"))
    k = sum(layer.delta_values.numel() for layer in model.apet_layers().values())
    assert suggested_lr(model) == suggested_lr(k, "magnitude")
    model.print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trainable params:")
    assert f"{suggested_lr(model):.1e}" in lines[1] and "magnitude" in lines[1] and f"K={k:,d}" in lines[1]
    with pytest.raises(TypeError, match="patched"):
        suggested_lr(tiny_llama())


def _step(model, optimizer):
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_a_rate_far_above_the_suggestion_warns_once_for_data_chosen_positions(method):
    model = get_apet_model(tiny_llama(), ApetConfig(num_params=3000, method=method))
    params = [p for p in model.parameters() if p.requires_grad]
    hot = torch.optim.AdamW(params, lr=10 * suggested_lr(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, hot)
        _step(model, hot)
    ours = [w for w in caught if "suggested for them" in str(w.message)]
    assert len(ours) == (1 if method == "magnitude" else 0), [str(w.message) for w in caught]
    if ours:
        assert "magnitude positions" in str(ours[0].message) and issubclass(ours[0].category, RuntimeWarning)
    # at the suggestion: silent; a warm-up scheduler is judged by the rate it ramps to (initial_lr)
    calm = torch.optim.AdamW(params, lr=suggested_lr(model))
    warm = torch.optim.AdamW(params, lr=10 * suggested_lr(model))
    torch.optim.lr_scheduler.LambdaLR(warm, lambda step: 0.0 if step == 0 else 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, calm)
        _step(model, warm)
    ours = [w for w in caught if "suggested for them" in str(w.message)]
    assert len(ours) == (1 if method == "magnitude" else 0)


def test_the_docs_table_is_what_suggested_lr_gives():
    """The positions guide's table of rates is written by hand: it must say what the code returns (2 significant
    digits)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "positions.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| tuned scalars K |"))
    table = lines[start:next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))]
    column_k = {"10³": 1e3, "10⁴": 1e4, "10⁵": 1e5, "3.3·10⁵": 3.3e5, "2·10⁶": 2e6}
    ks = [column_k[cell.strip()] for cell in table[0].strip().strip("|").split("|")[1:]]
    rows = {line.split("|")[1].strip(): line for line in table[2:]}  # only this table's rows
    for label, method in (("random, rows, cols, blocks", "random"), ("magnitude", "magnitude"),
                          ("gradient", "gradient")):
        cells = [float(c) for c in rows[label].strip().strip("|").split("|")[1:]]
        assert len(cells) == len(ks)
        for k, written in zip(ks, cells):
            assert written == pytest.approx(suggested_lr(int(k), method), rel=0.05), (method, k, written)
