"""Independent dense oracles and tolerances shared by the tests."""

import pytest
import torch

from apet_kernels import backends

# relative Frobenius error allowed per dtype (fp32 << 1e-3, bf16 1e-3..1e-2: the tolerances the device tool's
# METHOD.md sets for GPU checks, outside this repository)
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "result has NaN/inf (unwritten or poisoned element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close_rel(a, b, dtype, factor=1.0):
    err = rel_err(a, b)
    assert err <= REL_TOL[dtype] * factor, f"relative error {err:.3g} > {REL_TOL[dtype] * factor:.3g} ({dtype})"


def dense_delta(indices, values, shape) -> torch.Tensor:
    """S as a dense float64 matrix (the oracle may be dense; the code under test may not)."""
    s = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    s[indices.long().cpu()] = values.detach().double().cpu()
    return s.view(shape)


def random_indices(shape, k, gen_seed=0, dtype=torch.int32) -> torch.Tensor:
    g = torch.Generator().manual_seed(gen_seed)
    return torch.sort(torch.randperm(shape[0] * shape[1], generator=g)[:k]).values.to(dtype)


def oracle_linear(x, weight, bias, values, indices):
    """float64 forward and the three gradients for upstream gradient dy, densely."""
    w = weight.detach().double() + dense_delta(indices, values, weight.shape)
    y = x.detach().double() @ w.t()
    if bias is not None:
        y = y + bias.detach().double()
    return y, w


def backend_param(name):
    """A pytest param for one backend, skipped with the reason where it cannot run."""
    status = backends()[name]
    return pytest.param(name, marks=pytest.mark.skipif(not status["available"],
                                                       reason=f"{name} unavailable: {status['reason']}"))


# triton runs in the interpreter on CPU; native is the compiled extension when built
BACKENDS = [backend_param(name) for name in ("reference", "triton", "native")]


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer LLaMA (hidden 32, vocab 99) with weights drawn from ``seed``, in eval mode."""
    import transformers
    torch.manual_seed(seed)
    cfg = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_tokenizer(vocab_size: int = 99):
    """A word-level tokenizer over "w0".."w{n}" and four special tokens, built offline (no hub): what TRL's
    trainers need as a processing class for tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


class PhaseTokens(torch.utils.data.Dataset):
    """Causal-LM rows of a repeating pattern of four tokens, one of two phases per row: learnable in a few steps
    (the Trainer tests' dataset)."""

    def __init__(self, n=32, seq=12):
        phase = torch.arange(n)[:, None] % 2
        self.ids = 10 + (torch.arange(seq) + phase) % 4

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def sequence_logps(model, tokenizer, prompt, completion):
    """The summed log-probability ``model`` gives ``completion`` after ``prompt`` (DPO's quantity)."""
    ids = tokenizer(prompt + completion, return_tensors="pt")["input_ids"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return float(logps[n_prompt - 1:].sum())


def small_word_reward(completions, **kwargs):
    """A GRPO reward: the share of w1..w5 among each completion's words."""
    return [sum(w in {"w1", "w2", "w3", "w4", "w5"} for w in c.split()) / max(1, len(c.split())) for c in completions]
