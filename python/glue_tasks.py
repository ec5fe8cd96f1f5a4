"""GLUE-format task data through the `datasets` library: local TSV folders or the hub.

The local folders (../shared/data, see its PROVENANCE.md) are tab-separated with no quoting:
quote characters inside sentences are text, so they are read with QUOTE_NONE; "NA"/"null" are
words, not missing values; MRPC's header starts with a UTF-8 BOM; CoLA has no header.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import datasets


@dataclass(frozen=True)
class Task:
    name: str
    text: tuple[str, ...]             # one or two text columns
    label: str
    splits: dict = field(default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"})
    label_names: tuple[str, ...] | None = None  # string labels -> ids, in this order
    columns: tuple[str, ...] | None = None      # header-less files
    hub: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 2


TASKS = {
    "sst2": Task("sst2", ("sentence",), "label", hub=("glue", "sst2")),
    "rte": Task("rte", ("sentence1", "sentence2"), "label", label_names=("entailment", "not_entailment"),
                hub=("glue", "rte")),
    "mrpc": Task("mrpc", ("#1 String", "#2 String"), "Quality", hub=("glue", "mrpc")),
    "cola": Task("cola", ("sentence",), "label", columns=("source", "label", "original_label", "sentence"),
                 hub=("glue", "cola")),
    "rotten_tomatoes": Task("rotten_tomatoes", ("sentence",), "label",
                            splits={"train": "hf_split/train.tsv", "validation": "hf_split/validation.tsv"},
                            hub=("rotten_tomatoes",)),
}
FOLDER_NAMES = {"sst-2": "sst2", "rte": "rte", "mrpc": "mrpc", "cola": "cola", "rotten_tomatoes": "rotten_tomatoes"}


def task_for_folder(path: str) -> Task:
    key = FOLDER_NAMES.get(os.path.basename(os.path.normpath(path)).lower())
    if key is None:
        raise ValueError(f"cannot tell the task of {path!r}; pass --task ({', '.join(TASKS)})")
    return TASKS[key]


def load_local(task: Task, folder: str) -> datasets.DatasetDict:
    files = {split: os.path.join(folder, name) for split, name in task.splits.items()}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"missing task files: {missing}")
    kwargs = dict(sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    if task.columns:
        kwargs.update(header=None, names=list(task.columns))
    raw = datasets.load_dataset("csv", data_files=files, **kwargs)
    return raw.map(lambda ex: {"text_a": str(ex[task.text[0]]),
                               "text_b": str(ex[task.text[1]]) if len(task.text) > 1 else None,
                               "labels": _label_id(task, ex[task.label])}, remove_columns=raw["train"].column_names)


def load_hub(task: Task) -> datasets.DatasetDict:
    raw = datasets.load_dataset(*task.hub)
    cols = [c for c in raw["train"].column_names if c not in ("label", "idx")]
    a, b = (cols + [None])[:2] if len(task.text) > 1 else (cols[0], None)
    return raw.map(lambda ex: {"text_a": ex[a], "text_b": ex[b] if b else None, "labels": int(ex["label"])},
                   remove_columns=raw["train"].column_names)


def _label_id(task: Task, value) -> int:
    if task.label_names:
        value = str(value)
        if value not in task.label_names:
            raise ValueError(f"{task.name}: unknown label {value!r} (expected one of {task.label_names})")
        return task.label_names.index(value)
    return int(value)
