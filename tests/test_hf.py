"""Hugging Face integration on tiny models built from configs (no hub)."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from apet_kernels import ApetConfig, SparseDeltaLinear, get_apet_model, load_apet  # noqa: E402

V = 99


def _seq_cls(cfg_cls, model_cls, **kw):
    return (lambda: getattr(transformers, cfg_cls)(**kw, num_labels=3), model_cls,
            lambda ids: {"input_ids": ids, "labels": torch.tensor([0, 2])})


def _causal(cfg_cls, model_cls, **kw):
    return (lambda: getattr(transformers, cfg_cls)(**kw), model_cls, lambda ids: {"input_ids": ids, "labels": ids})


SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
# One line per architecture: (config factory, model class, inputs with labels)
ARCHS = {
    "bert": _seq_cls("BertConfig", "BertForSequenceClassification", intermediate_size=37, **SMALL),
    "roberta": _seq_cls("RobertaConfig", "RobertaForSequenceClassification", intermediate_size=37, pad_token_id=1,
                        **SMALL),
    "gpt2": _causal("GPT2Config", "GPT2LMHeadModel", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": _causal("LlamaConfig", "LlamaForCausalLM", intermediate_size=64, num_key_value_heads=2, **SMALL),
    "mistral": _causal("MistralConfig", "MistralForCausalLM", intermediate_size=64, num_key_value_heads=2, **SMALL),
    "qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM", intermediate_size=64, num_key_value_heads=2, **SMALL),
    "t5": (lambda: transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                         decoder_start_token_id=0),
           "T5ForConditionalGeneration", lambda ids: {"input_ids": ids, "labels": ids[:, :5].clone()}),
    "bloom": _causal("BloomConfig", "BloomForCausalLM", vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
    "opt": _causal("OPTConfig", "OPTForCausalLM", ffn_dim=37, max_position_embeddings=64, word_embed_proj_dim=32,
                   **SMALL),
}


def build(arch, seed=0):
    make_config, cls_name, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(make_config())
    return model.eval()  # no dropout: outputs comparable across calls


def batch(arch):
    g = torch.Generator().manual_seed(7)
    return ARCHS[arch][2](torch.randint(3, V, (2, 9), generator=g))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("strategy", ["auto", "unmerged"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_end_to_end(arch, strategy, tmp_path):
    base = build(arch)
    inputs = batch(arch)
    reference = logits(base, inputs)
    original = {n: t.clone() for n, t in base.state_dict().items()}

    model = get_apet_model(base, ApetConfig(density=0.05, seed=1, strategy=strategy))
    layers = model.apet_layers()
    assert layers and all(isinstance(m, SparseDeltaLinear) for m in layers.values())
    assert torch.equal(logits(model, inputs), reference), "patched output at start must equal the base model's"

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(m.delta_values) for m in layers.values()}
    opt = torch.optim.AdamW(trainable, lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    patched = logits(model, inputs)

    model.save_apet(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "apet_config.json",
                                           "model.safetensors"]
    k_total = sum(m.delta_values.numel() for m in layers.values())
    assert os.path.getsize(tmp_path / "model.safetensors") < 4 * k_total + 200 * len(layers) + 1024
    loaded = load_apet(build(arch), str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), patched, rtol=0, atol=0)

    restored = loaded.unload()
    assert not any(isinstance(m, SparseDeltaLinear) for m in restored.modules())
    for name, t in restored.state_dict().items():
        assert torch.equal(t, original[name]), f"unload() changed {name}"

    merged = model.merge_and_unload()
    assert not any(isinstance(m, SparseDeltaLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), patched, rtol=1e-5, atol=1e-5)


def test_print_trainable_parameters_peft_format(capsys):
    model = get_apet_model(build("llama"), ApetConfig(num_params=500))
    model.print_trainable_parameters()
    first, *rest = capsys.readouterr().out.strip().splitlines()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 500
    assert first == f"trainable params: 500 || all params: {total:,d} || trainable%: {100 * 500 / total:.4f}"
    assert len(rest) == 1 and rest[0].startswith("suggested lr")  # ours, on a line of its own


def test_target_modules_forms_and_heads():
    gpt2 = get_apet_model(build("gpt2"), ApetConfig(density=0.01))
    assert "lm_head" not in gpt2.apet_layers()  # the output head is excluded from all-linear
    names = set(get_apet_model(build("llama"), ApetConfig(density=0.01, target_modules=["q_proj", "v_proj"]))
                .apet_layers())
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    regex = set(get_apet_model(build("llama"), ApetConfig(density=0.01, target_modules=r".*mlp\.(up|down)_proj"))
                .apet_layers())
    assert regex == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")}
    excl = get_apet_model(build("llama"), ApetConfig(density=0.01, exclude_modules=["o_proj", "gate_proj"]))
    assert not any(n.endswith(("o_proj", "gate_proj")) for n in excl.apet_layers())
    with pytest.raises(ValueError, match="matches no"):
        get_apet_model(build("llama"), ApetConfig(density=0.01, target_modules=["nothing"]))


def test_budget_like_counts():
    base = build("llama")
    lora = get_apet_model(base, ApetConfig(budget_like="lora:r=4"))
    expected = sum(4 * sum(m.delta_base.shape) * 0 + 4 * (m.out_features + m.in_features)
                   for m in lora.apet_layers().values())
    assert lora.get_nb_trainable_parameters()[0] == expected
    bert = build("bert")
    n_bias = sum(p.numel() for n, p in bert.named_parameters() if n.endswith("bias"))
    assert get_apet_model(bert, ApetConfig(budget_like="bitfit")).get_nb_trainable_parameters()[0] == n_bias
    assert get_apet_model(build("llama"), ApetConfig(budget_like="prompt:n=10")).get_nb_trainable_parameters()[0] == 320
    adapter = get_apet_model(build("llama"), ApetConfig(budget_like="adapter:d=4"))
    assert adapter.get_nb_trainable_parameters()[0] == 2 * 2 * (2 * 32 * 4 + 4 + 32)
    with pytest.raises(ValueError, match="unknown budget_like"):
        get_apet_model(build("llama"), ApetConfig(budget_like="ia3"))


def test_config_needs_one_budget():
    with pytest.raises(ValueError, match="exactly one"):
        ApetConfig()
    with pytest.raises(ValueError, match="exactly one"):
        ApetConfig(num_params=3, density=0.1)


def test_tied_output_head_is_never_written():
    base = build("gpt2")
    wte = base.transformer.wte.weight.detach().clone()
    model = get_apet_model(base, ApetConfig(density=0.05, target_modules=["lm_head"]))
    head = model.apet_layers()["lm_head"]
    assert head.strategy == "unmerged"  # the weight is shared with the input embeddings
    inputs = batch("gpt2")
    opt = torch.optim.SGD([head.delta_values], lr=1.0)
    model(**inputs).loss.backward()
    opt.step()
    model(**inputs)
    assert torch.equal(base.transformer.wte.weight, wte)
    with pytest.raises(ValueError, match="shared"):
        get_apet_model(build("gpt2"), ApetConfig(density=0.05, target_modules=["lm_head"], strategy="merged"))


def test_modules_to_save_train_and_round_trip(tmp_path):
    model = get_apet_model(build("bert"), ApetConfig(density=0.02, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    inputs = batch("bert")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    model.save_apet(str(tmp_path))
    loaded = load_apet(build("bert"), str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_disable_apet_gives_base_outputs():
    base = build("llama")
    inputs = batch("llama")
    reference = logits(base, inputs)
    model = get_apet_model(base, ApetConfig(density=0.05))
    for m in model.apet_layers().values():
        with torch.no_grad():
            m.delta_values.normal_()
    tuned = logits(model, inputs)
    assert not torch.equal(tuned, reference)
    with model.disable_apet():
        assert torch.equal(logits(model, inputs), reference)
    torch.testing.assert_close(logits(model, inputs), tuned, rtol=0, atol=0)


@pytest.mark.parametrize("method,stored", [("random", False), ("rows", False), ("blocks", False),
                                           ("magnitude", True)])
def test_adapters_store_indices_unless_a_seed_regenerates_them(tmp_path, method, stored):
    model = get_apet_model(build("llama"), ApetConfig(density=0.05, method=method))
    inputs = batch("llama")
    for m in model.apet_layers().values():
        m.delta_values.data.normal_(0, 0.05)
    model.save_apet(str(tmp_path))
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.endswith(".indices") for k in keys) == stored
    loaded = load_apet(build("llama"), str(tmp_path), strict=True)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def _saved(tmp_path, arch="llama"):
    model = get_apet_model(build(arch), ApetConfig(density=0.05))
    model.save_apet(str(tmp_path))
    return tmp_path


def _assert_untouched(model):
    assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())


def test_load_into_other_shapes_names_the_layer(tmp_path):
    _saved(tmp_path)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                                                   num_attention_heads=4, intermediate_size=64,
                                                                   num_key_value_heads=2))
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter layer 'model\.layers\.0\.\S+' has shape \(32, \d+\), the model's is \(48"):
        load_apet(other, str(tmp_path))
    _assert_untouched(other)
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items())


def test_load_into_other_architecture_names_the_missing_layer(tmp_path):
    _saved(tmp_path)
    other = build("opt")
    with pytest.raises(ValueError, match="is not a linear layer of this model"):
        load_apet(other, str(tmp_path))
    _assert_untouched(other)


def test_load_with_checksum_mismatch(tmp_path):
    _saved(tmp_path)
    cfg_path = tmp_path / "apet_config.json"
    data = json.loads(cfg_path.read_text())
    data["adapters"]["default"]["seed"] = 12345
    cfg_path.write_text(json.dumps(data))
    base = build("llama")
    with pytest.raises(ValueError, match="checksum"):
        load_apet(base, str(tmp_path))
    _assert_untouched(base)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_load_damaged_file_gives_clear_error(tmp_path, damage):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:  # a pickle in place of safetensors must never be unpickled
        import pickle
        path.write_bytes(pickle.dumps({"x": 1}))
    base = build("llama")
    with pytest.raises(ValueError, match="truncated or malformed"):
        load_apet(base, str(tmp_path))
    _assert_untouched(base)


def test_load_rejects_foreign_tensors(tmp_path):
    _saved(tmp_path)
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] = torch.zeros(V, 32)
    save_file(tensors, path)
    base = build("llama")
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_apet(base, str(tmp_path))
    _assert_untouched(base)


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_gradient_checkpointing(strategy):
    base = build("llama")
    base.train()
    model = get_apet_model(base, ApetConfig(density=0.05, strategy=strategy))
    model.activation_checkpointing_enable()
    inputs = batch("llama")
    model(**inputs).loss.backward()
    grads = [m.delta_values.grad for m in model.apet_layers().values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    plain = get_apet_model(build("llama").train(), ApetConfig(density=0.05, strategy=strategy))
    plain(**inputs).loss.backward()
    for a, b in zip(grads, [m.delta_values.grad for m in plain.apet_layers().values()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torch_compile_of_patched_model_matches_eager():
    torch._dynamo.reset()
    model = get_apet_model(build("llama"), ApetConfig(density=0.05))
    for m in model.apet_layers().values():
        with torch.no_grad():
            m.delta_values.normal_(0, 0.1)
    inputs = batch("llama")
    eager = logits(model, inputs)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(**inputs).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_apet_model_deepcopies_and_pickles_consistently(tmp_path):
    import copy
    import pickle
    model = get_apet_model(build("llama"), ApetConfig(density=0.05))
    inputs = batch("llama")
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone, inputs), logits(model, inputs), rtol=0, atol=0)
    assert clone.forward.__self__ is clone  # the copy runs its own layers
    assert {id(p) for p in clone.parameters()}.isdisjoint(id(p) for p in model.parameters())
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(logits(restored, inputs), logits(model, inputs), rtol=0, atol=0)


def test_load_rejects_bad_stored_indices_before_touching_the_model(tmp_path):
    model = get_apet_model(build("llama"), ApetConfig(density=0.05, method="magnitude"))
    model.save_apet(str(tmp_path))
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith(".indices"))
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path)
    base = build("llama")
    with pytest.raises(ValueError, match="unsorted"):
        load_apet(base, str(tmp_path))
    _assert_untouched(base)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2-tied"])
def test_modules_to_save_on_a_tied_output_head_trains_saves_and_restores_it(arch, tmp_path):
    def make():
        if arch == "gpt2":
            return build("gpt2")
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    base = make()
    head = base.get_output_embeddings().weight
    assert head is base.get_input_embeddings().weight  # tied
    original = head.detach().clone()
    with pytest.warns(UserWarning, match="lm_head.weight is tied to"):
        model = get_apet_model(base, ApetConfig(density=0.02, modules_to_save=["lm_head"]))
    assert head.requires_grad
    inputs = batch("gpt2")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    assert not torch.equal(head, original)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="tied"):
        loaded = load_apet(make(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    restored = model.unload()
    assert torch.equal(restored.get_output_embeddings().weight, original)
    assert torch.equal(restored.get_input_embeddings().weight, original)
