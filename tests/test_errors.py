"""The library raises its own exception family (issue 32): every ApetError is also the built-in exception it
refines, so existing ``except ValueError`` clauses still catch it, and the library's code raises no bare
ValueError / TypeError / RuntimeError / FileNotFoundError of its own."""

import re
from pathlib import Path

import pytest
import torch

import apet_kernels
from _helpers import tiny_llama
from apet_kernels import (AdapterFileError, AdapterFileNotFoundError, ApetConfig, ApetError, ApetStateError,
                          ApetTypeError, ApetValueError, BaseMismatchError, SparseDeltaLinear, get_apet_model,
                          load_apet, StateDictError)

PACKAGE = Path(apet_kernels.__file__).parent


@pytest.mark.parametrize("cls,builtin", [(ApetValueError, ValueError), (ApetTypeError, TypeError),
                                         (ApetStateError, RuntimeError), (AdapterFileError, ValueError),
                                         (AdapterFileNotFoundError, FileNotFoundError),
                                         (BaseMismatchError, ValueError), (StateDictError, RuntimeError)])
def test_each_error_is_an_apet_error_and_its_builtin(cls, builtin):
    assert issubclass(cls, ApetError) and issubclass(cls, builtin)


def test_the_library_raises_no_bare_builtin_error():
    bare = re.compile(r"raise (ValueError|TypeError|RuntimeError|FileNotFoundError)\(")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "errors.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if bare.search(line)]
    assert not found, found


def test_each_kind_where_it_arises(tmp_path):
    with pytest.raises(ApetValueError, match="num_params"):
        ApetConfig(num_params=-1)
    with pytest.raises(ApetTypeError, match="2-D .weight"):
        SparseDeltaLinear(torch.nn.ReLU(), torch.tensor([0]))
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05, strategy="unmerged"))
    model.add_adapter(ApetConfig(density=0.05, seed=2), adapter_name="b")
    with model.mixed_batch(["default", "b"]):
        with pytest.raises(ApetStateError, match="mixed-adapter batch"):
            model.set_adapter("b")
    with pytest.raises(AdapterFileNotFoundError):
        load_apet(tiny_llama(), str(tmp_path / "nothing"))
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="truncated or malformed"):
        load_apet(tiny_llama(), str(tmp_path / "a"))
    with pytest.raises(StateDictError, match="nothing was loaded"):
        model.load_state_dict({"lm_head.weight": torch.zeros(3, 3)}, strict=False)
    model.save_pretrained(tmp_path / "b")
    with pytest.raises(BaseMismatchError, match="shape"):
        load_apet(tiny_llama(intermediate_size=48), str(tmp_path / "b"))


def test_saving_an_adapter_into_a_folder_that_holds_a_model_refuses_and_writes_nothing(tmp_path):
    """Issue 33's area 'saving into a folder that already holds a model': model.safetensors is also the file name
    a base model saves its weights to."""
    base = tiny_llama()
    base.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    model = get_apet_model(tiny_llama(), ApetConfig(density=0.05))
    with pytest.raises(AdapterFileError, match="holds a model's weights"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "apet_config.json").exists()
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "adapter")  # over its own earlier save: fine
