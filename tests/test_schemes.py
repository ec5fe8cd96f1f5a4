"""Position schemes live in one table (apet_kernels.schemes, issue 41): the config, select_indices' seeded list,
suggested_lr and its warning, and the recipes' command lines all read it, so a scheme added there is known everywhere
and one missing from a reader fails here."""

import sys
from pathlib import Path

import pytest

from apet_kernels import ApetConfig, suggested_lr
from apet_kernels.learning_rate import WARNED_METHODS
from apet_kernels.schemes import SCHEMES, SEEDED, is_seeded
from apet_kernels.selection import DATA_METHODS, METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))


def test_the_package_reads_the_one_table():
    assert METHODS == SEEDED and set(METHODS) | set(DATA_METHODS) == set(SCHEMES)
    assert set(WARNED_METHODS) == {n for n, s in SCHEMES.items() if s.warn_above}
    for name, scheme in SCHEMES.items():
        assert ApetConfig(num_params=10, method=name).method == name
        assert suggested_lr(10**4, name) > 0  # every scheme has rates, its own or another's
        assert is_seeded(name) == (scheme.needs == "seed") and scheme.needs in ("seed", "weight", "data")
    with pytest.raises(ValueError, match="unknown method"):
        ApetConfig(num_params=10, method="diagonal")


def test_the_recipes_command_lines_read_it():
    import finetune
    import study
    for name in SCHEMES:
        args = finetune.parse_args(["--data-dir", "x", "--position", name])
        assert args.position == name
    assert study.SCHEMES[:len(SCHEMES)] == tuple(SCHEMES)
