"""Every code block of the README, CONTRIBUTING.md, CHANGELOG.md and docs/ runs (issue 44).

Blocks are read by pytest-codeblocks' parser; this file runs them, each in a fresh interpreter (python) or bash,
from a scratch folder holding `base/` (a tiny LLaMA saved with `save_pretrained`) and `adapter/` (an APET adapter
saved for it), with the repository's `bench/`, `python/` and `tests/` linked in. A block that cannot run here (it
needs a GPU, a cluster, vLLM or the network) carries `<!--pytest.mark.skip(reason="...")-->` and the reason. A
`diff` block runs twice: the program before and the program after. `json`, `yaml` and `toml` blocks are parsed;
`text` blocks (figures, printed output) are not code. Any other language fails, so a new block cannot go unrun.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import tiny_tokenizer

pytest_codeblocks = pytest.importorskip("pytest_codeblocks", reason="the [test] extra installs pytest-codeblocks")

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md",
                *(ROOT / "docs").rglob("*.md")])
RUN = {"python", "bash", "sh", "diff"}
PARSE = {"json", "yaml", "toml"}
NOT_CODE = {"text"}
TIMEOUT_S = 600


def _blocks():
    for page in PAGES:
        if not page.exists():
            continue
        for block in pytest_codeblocks.extract_from_file(page):
            rel = page.relative_to(ROOT)
            yield pytest.param(block, id=f"{rel}:{block.lineno}",
                               marks=[eval(m, {"pytest": pytest}) for m in block.marks])  # noqa: S307


BLOCKS = list(_blocks())


def _sides(diff: str) -> tuple[str, str]:
    before, after = [], []
    for line in diff.splitlines():
        sign, rest = line[:1], line[1:]
        if sign in (" ", ""):
            before.append(rest), after.append(rest)
        elif sign == "-":
            before.append(rest)
        elif sign == "+":
            after.append(rest)
        else:
            raise AssertionError(f"not a unified-diff line: {line!r}")
    return "\n".join(before) + "\n", "\n".join(after) + "\n"


@pytest.fixture(scope="module")
def scratch_template(tmp_path_factory):
    """`base/` and `path/to/model`: a tiny LLaMA with a word-level tokenizer over "w0".."w123" (built offline);
    `adapter/`: an APET adapter with random values on it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import apet_kernels as ak

    root = tmp_path_factory.mktemp("docs-scratch")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tiny_tokenizer(config.vocab_size).save_pretrained(root / "base")
    shutil.copytree(root / "base", root / "path" / "to" / "model")  # the placeholder the pages write
    model = ak.get_apet_model(LlamaForCausalLM.from_pretrained(root / "base"), ak.ApetConfig(budget_like="lora:r=2"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-2)
    model.save_pretrained(root / "adapter")
    return root


@pytest.fixture
def scratch(scratch_template, tmp_path):
    """A function giving a fresh scratch folder each call."""
    def fresh(name="work"):
        work = tmp_path / name
        shutil.copytree(scratch_template, work)
        for linked in ("bench", "python", "tests"):
            (work / linked).symlink_to(ROOT / linked)
        return work
    return fresh


def _run(argv, cwd, what):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{what} failed (rc {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"


def test_every_block_has_a_known_language_and_every_skip_a_reason():
    unknown, silent = [], []
    for param in BLOCKS:
        block, where = param.values[0], param.id
        if (block.syntax or "") not in RUN | PARSE | NOT_CODE:
            unknown.append(f"{where} ({block.syntax or 'no language'})")
        for mark in block.marks:
            if "skip" in mark and not re.search(r"reason\s*=\s*['\"].{10,}", mark):
                silent.append(where)
    assert not unknown, f"blocks in a language the runner does not know (mark figures `text`): {unknown}"
    assert not silent, f"skipped blocks must say why (reason=...): {silent}"


def test_links_outside_the_docs_site_point_at_files():
    # mkdocs build --strict checks links between docs/ pages; these pages live beside it.
    broken = []
    for page in (ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken


def test_the_runner_sees_the_pages():
    # A moved page or a renamed fence must not make the runner pass by running nothing.
    pages = {p.id.split(":")[0] for p in BLOCKS}
    assert {"README.md", "docs/guides/peft.md"} <= pages, pages
    assert sum(1 for p in BLOCKS if p.values[0].syntax == "python") >= 12


@pytest.mark.parametrize("block", BLOCKS)
def test_block(block, scratch):
    syntax = block.syntax or ""
    where = scratch() if syntax in RUN else None
    if syntax in NOT_CODE:
        return
    if syntax == "json":
        json.loads(block.code)
    elif syntax == "yaml":
        import yaml
        yaml.safe_load(block.code)
    elif syntax == "toml":
        import tomllib  # Python >= 3.11; the [test] extra's hypothesis-era pythons have it
        tomllib.loads(block.code)
    elif syntax == "python":
        _run([sys.executable, "-c", block.code], where, "the block")
    elif syntax == "diff":
        before, after = _sides(block.code)
        _run([sys.executable, "-c", before], where, "the program before the diff")
        _run([sys.executable, "-c", after], scratch("after"), "the program after the diff")
    elif syntax in ("bash", "sh"):
        _run(["bash", "-euo", "pipefail", "-c", block.code], where, "the block")
    else:
        pytest.fail(f"no runner for {syntax!r}")
