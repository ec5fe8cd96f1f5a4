"""No module in a folder that a script puts first on sys.path shadows an installed package.

`python bench/compare.py` puts bench/ first on sys.path (and compare.py adds the repository root), pytest
puts tests/ there, python/'s recipes add python/ and the root, `.ci/run` runs .ci/smoke_wheel.py. A module
there named like an installed top-level package (bench/kernels.py against Hugging Face's `kernels`, which
transformers 5.25 imports) is found first and breaks whatever imports that package (issue 30).
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ["", "bench", "python", "tests", "tests/distributed", ".ci"]


def _top_level_names(folder: Path) -> set[str]:
    """What `import NAME` would find in this folder: modules, packages and extension modules."""
    names = {p.name.split(".")[0] for p in folder.iterdir() if p.is_file() and p.suffix in (".py", ".so", ".pyd")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def test_script_folders_are_listed_and_hold_modules():
    # the check below must look at real folders, or it passes on nothing
    for folder in SCRIPT_FOLDERS:
        assert (ROOT / folder).is_dir(), folder
    assert {"compare", "methods", "bench_kernels"} <= _top_level_names(ROOT / "bench")
    assert {"finetune", "glue_tasks"} <= _top_level_names(ROOT / "python")


def test_no_script_folder_module_shadows_an_installed_or_stdlib_module():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    assert "torch" in installed and "transformers" in installed  # the table is the environment's
    clashes = []
    for folder in SCRIPT_FOLDERS:
        for name in sorted(_top_level_names(ROOT / folder)):
            if name == "apet_kernels" and folder == "":
                continue  # the package itself, installed from this very folder
            if name in installed:
                clashes.append(f"{folder or '.'}/{name}: shadows {installed[name]}")
            elif name in sys.stdlib_module_names:
                clashes.append(f"{folder or '.'}/{name}: shadows the standard library's {name}")
    assert not clashes, "rename these modules (script folders sit first on sys.path):\n" + "\n".join(clashes)
