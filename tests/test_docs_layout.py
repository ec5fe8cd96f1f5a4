"""The design page's Layout section (docs/design.md) names every module of the package and of the script folders (issue 32 found 8
missing), and names none that does not exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layout() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.index("## Layout")
    return text[start:text.index("```", text.index("```", start) + 3)]


def test_every_module_is_in_the_layout():
    layout = _layout()
    files = [p for folder in ("apet_kernels", "bench", "python", ".ci") for p in (ROOT / folder).rglob("*")
             if p.is_file() and (p.suffix == ".py" or p.parent.name == ".ci" or p.suffix == ".sh")
             and "results" not in p.parts and "runs" not in p.parts and p.name != "__init__.py"
             and not p.name.startswith("_build")]
    missing = [str(p.relative_to(ROOT)) for p in files if p.name not in layout]
    assert not missing, f"docs/design.md's Layout does not name {missing}"


def test_the_layout_names_no_file_that_is_gone():
    named = set(re.findall(r"[\w/]+\.(?:py|sh|h|cpp|cu)\b", _layout()))
    existing = {p.name for p in ROOT.rglob("*") if p.is_file()} | \
        {str(p.relative_to(ROOT / d)) for d in ("apet_kernels", "apet_kernels/ops", "csrc")
         for p in (ROOT / d).rglob("*") if p.is_file()}
    gone = sorted(n for n in named if n.split("/")[-1] not in existing and n not in existing)
    assert not gone, f"docs/design.md's Layout names files that do not exist: {gone}"
