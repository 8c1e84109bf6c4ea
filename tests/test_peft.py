"""Adapters that leave minilora: Hugging Face PEFT export and import, merged checkpoints.

The round trips run against the real libraries (torch, transformers, peft: the `compare`
extra) and are skipped where they are not installed; the refusals and minilora's own
round trips need none of them.

Tolerances. Both sides compute the same float32 sums in different orders (BLAS blocking,
the fused c_attn against minilora's three blocks, s * x A B against PEFT's
lora_B(lora_A(x)) * s): each logit is a chain of ~10 matmuls and layer norms over 16-64
terms of magnitude <= ~2, so the difference is a few hundred float32 roundings of values
<= ~2, ~ 300 * 6e-8 * 2 ~ 4e-5 in the worst case and ~1e-6 as measured; 1e-5 (the issue's)
holds with room and is far below the adapters' own effect (> 1e-3, asserted). In float64
the same count gives ~1e-13; 1e-10 is used.
"""

import json
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import peft as mpeft
from minilora.cli import main
from minilora.export import export_merged
from minilora.gradcheck import MODEL_TOL, check_model
from minilora.weights import save_pretrained

from cli_helpers import error_line

TINY = ml.GPTConfig(vocab_size=100, context_length=32, emb_dim=16, n_heads=2, n_layers=2)
F32_TOL, F64_TOL = 1e-5, 1e-10
IDX = np.array([[5, 17, 17, 3, 99, 0, 42], [8, 1, 64, 64, 2, 33, 7]])  # repeated ids on purpose

# What PEFT 0.21 / transformers 5 warn about on every PeftModel, whatever the adapter: not about the file
LIBRARY_NOISE = ("`is_gradient_checkpointing` is deprecated",)
# What PEFT warns about whenever lm_head (nn.Linear, tied to wte) is a target beside GPT-2's Conv1D
# layers, for any file: it flips the one shared fan_in_fan_out for the other kind, and warns that
# the target is tied to the embedding. Not avoidable from the adapter's side (peft.py's docstring);
# with lm_head alone, only the second.
LM_HEAD_WARNINGS = ("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`",
                    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny GPT-2 in the Hugging Face layout (model.safetensors + config.json)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2-base")
    save_pretrained(ml.GPTModel(TINY, seed=0), folder)
    return folder


def libs():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


def adapted(base_folder, dtype="float32", classes=None, seed=1, **lora):
    """The base model with LoRA (rank 2, alpha 3 unless given) and random non-zero B, so
    that every adapter changes the logits: B ~ N(0, (0.3 / s)^2), s the adapter's scale,
    keeps each adapter's delta, and the logits, of order 1 whatever the scaling."""
    model = ml.GPTModel.from_pretrained(base_folder, dtype=dtype).eval()
    if classes:
        model.replace_head(classes)
    ml.apply_lora(model, **{"rank": 2, "alpha": 3, **lora})
    rng = np.random.default_rng(seed)
    for ad in model.lora.adapters:
        B = model.params[ad.prefix + ".lora_B"]
        B[...] = rng.normal(0.0, 0.3 / ad.scale, B.shape)
    return model


def snapshot(model):
    return {n: np.array(p, copy=True) for n, p in model.params.items()}


def assert_unchanged(model, before):
    assert set(model.params) == set(before)
    for n, p in before.items():
        np.testing.assert_array_equal(model.params[n], p, err_msg=n)


def hf_model(folder, dtype, transformers, torch):
    return transformers.GPT2LMHeadModel.from_pretrained(
        str(folder), dtype=torch.float64 if dtype == "float64" else torch.float32).eval()


def peft_logits(base_folder, adapter_folder, dtype="float32"):
    """Logits of PeftModel.from_pretrained(GPT2LMHeadModel(base), folder) and the warnings
    raised while loading (the library's own noise left out)."""
    torch, transformers, peft = libs()
    hf = hf_model(base_folder, dtype, transformers, torch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, str(adapter_folder)).eval()
    said = [str(w.message) for w in caught if not str(w.message).startswith(LIBRARY_NOISE)]
    with torch.no_grad():
        return pm(torch.tensor(IDX)).logits.numpy(), said


# ---------------------------------------------------------------------------- minilora -> PEFT

TARGETS = {"all": "all", "attention": "attention", "q only": ["c_attn.q"], "head only": ["lm_head"],
           "one block": ["h.1.mlp.c_fc", "h.1.attn.c_attn.k", "h.0.attn.c_proj"], "whole c_attn": ["c_attn"]}


@pytest.mark.parametrize("scaling", ml.lora.SCALINGS)
@pytest.mark.parametrize("targets", TARGETS, ids=list(TARGETS))
def test_a_minilora_adapter_runs_in_peft_to_the_same_logits(tmp_path, base_folder, targets, scaling):
    libs()
    model = adapted(base_folder, targets=TARGETS[targets], scaling=scaling, rank=3, alpha=5)
    ml.export_peft(model, tmp_path / "peft")
    logits, said = peft_logits(base_folder, tmp_path / "peft")
    ours = model.forward(IDX)
    np.testing.assert_allclose(logits, ours, rtol=0, atol=F32_TOL)
    ml.disable_lora(model)
    assert np.abs(ours - model.forward(IDX)).max() > 100 * F32_TOL  # the adapters matter (Q alone least)
    allowed = LM_HEAD_WARNINGS if "lm_head" in model.lora.targets else ()
    assert [w for w in said if not w.startswith(allowed)] == []


@pytest.mark.parametrize("scaling", ml.lora.SCALINGS)
def test_the_same_logits_in_float64(tmp_path, base_folder, scaling):
    libs()
    model = adapted(base_folder, dtype="float64", scaling=scaling)
    ml.export_peft(model, tmp_path / "peft")
    logits, _ = peft_logits(base_folder, tmp_path / "peft", dtype="float64")
    assert logits.dtype == np.float64
    np.testing.assert_allclose(logits, model.forward(IDX), rtol=0, atol=F64_TOL)


def test_the_export_holds_the_adapter_alone_in_peft_names(tmp_path, base_folder):
    """Q/K/V of rank 2 become one rank-6 c_attn module (rank_pattern), its scale kept by
    alpha_pattern; no copy of the tied embedding; PEFT's metadata."""
    model = adapted(base_folder, scaling="alpha", rank=2, alpha=3)  # s = 3 for every adapter
    folder = ml.export_peft(model, tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 2, 6, False)
    assert config["rank_pattern"] == {"attn.c_attn": 6} and config["alpha_pattern"] == {"attn.c_attn": 18}
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"]
    tensors = load_file(folder / "adapter_model.safetensors")
    assert len(tensors) == 2 * (4 * TINY.n_layers + 1)
    A = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    C = TINY.emb_dim
    assert A.shape == (6, C) and B.shape == (3 * C, 6)
    np.testing.assert_array_equal(A[2:4], model.params["h.0.attn.c_attn.k.lora_A"].T)
    np.testing.assert_array_equal(B[C:2 * C, 2:4], model.params["h.0.attn.c_attn.k.lora_B"].T)
    assert not B[:C, 2:].any() and not B[C:2 * C, :2].any()  # block-diagonal
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_peft_loads_the_export_without_a_warning_when_the_head_has_no_adapter(tmp_path, base_folder):
    libs()
    model = adapted(base_folder, targets=["c_attn.q", "c_attn.v", "c_proj", "c_fc"])
    ml.export_peft(model, tmp_path / "peft")
    _, said = peft_logits(base_folder, tmp_path / "peft")
    assert said == []


def test_peft_loads_an_lm_head_only_export_without_the_fan_in_fan_out_warning(tmp_path, base_folder):
    """lm_head is an nn.Linear: a fan_in_fan_out of true (right for GPT-2's Conv1D) made PEFT
    warn that it set it back to false; for lm_head alone export writes false."""
    libs()
    model = adapted(base_folder, targets=["lm_head"])
    ml.export_peft(model, tmp_path / "peft")
    logits, said = peft_logits(base_folder, tmp_path / "peft")
    assert [w for w in said if not w.startswith(LM_HEAD_WARNINGS[1])] == []  # the tie alone
    np.testing.assert_allclose(logits, model.forward(IDX), rtol=0, atol=F32_TOL)


@pytest.mark.parametrize("targets, conv1d", [(["lm_head"], False), (["c_fc"], True), (["c_fc", "lm_head"], True)])
def test_fan_in_fan_out_says_whether_a_conv1d_is_targeted(tmp_path, base_folder, targets, conv1d):
    ml.export_peft(adapted(base_folder, targets=targets), tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is conv1d


def test_an_export_names_its_base_model_so_that_it_is_found_from_another_folder(tmp_path, base_folder,
                                                                                 monkeypatch, capsys):
    """A model loaded from a relative path ("tiny") was recorded as "tiny": read from any
    other folder, the PEFT adapter named no model ("unknown model 'tiny'")."""
    shutil.copytree(base_folder, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    model = adapted("tiny")
    ml.export_peft(model, "pfok")
    config = json.loads((tmp_path / "pfok" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "tiny")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["export", "../pfok", "--merged", "--out", "m2"]) == 0
    capsys.readouterr()
    back = ml.GPTModel.from_pretrained("m2").eval()
    np.testing.assert_allclose(back.forward(IDX), model.forward(IDX), rtol=0, atol=F32_TOL)


def test_export_with_a_base_model_not_found_says_where_its_name_came_from(tmp_path, base_folder, monkeypatch,
                                                                          capsys):
    folder = peft_folder(tmp_path, base_folder)
    edit_config(folder, base_model_name_or_path="tiny")  # relative to wherever PEFT ran
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(folder), "--merged", "--out", "m2"]) == 1
    line = error_line(capsys)
    assert line.startswith("minilora export: error: unknown model 'tiny'")
    assert line.endswith(f"(the base model recorded in {folder}; pass --model to say where it is)")
    assert not (tmp_path / "m2").exists()


def test_numpy_scalar_settings_export(tmp_path, base_folder):
    """apply_lora takes NumPy numbers; json.dumps does not write them (TypeError: float32)."""
    model = adapted(base_folder, rank=np.int64(2), alpha=np.float32(2.5), dropout=np.float32(0.25),
                    targets=["c_fc"])
    ml.export_peft(model, tmp_path / "peft")
    back = ml.GPTModel.from_pretrained(base_folder).eval()
    config = mpeft.load_peft_adapter(back, tmp_path / "peft")
    assert (config["rank"], config["alpha"], config["dropout"]) == (2, 2.5, 0.25)  # lora_alpha = s * r, s = 2.5 / 2
    np.testing.assert_array_equal(back.forward(IDX), model.forward(IDX))


# ---------------------------------------------------------------------------- PEFT -> minilora


def cross_entropy(logits, y):
    """Mean token cross-entropy and its gradient (softmax - onehot) / N, in NumPy."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(z)
    loss = -np.log(p[np.arange(n), y.reshape(-1)]).mean()
    p[np.arange(n), y.reshape(-1)] -= 1.0
    return loss, (p / n).reshape(logits.shape)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_peft_adapter_gives_the_same_logits_and_the_same_training_step(tmp_path, base_folder, use_rslora):
    """PEFT's default fused c_attn adapter (and c_proj, c_fc, lm_head) with random A and B,
    rank_pattern and alpha_pattern: minilora loads it to the same logits, and one SGD step
    on the same loss gives both the same gradients and the same new adapter."""
    torch, transformers, peft = libs()
    hf = hf_model(base_folder, "float64", transformers, torch)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"],
                             rank_pattern={"mlp.c_fc": 4}, alpha_pattern={"lm_head": 7}, use_rslora=use_rslora,
                             init_lora_weights=False, lora_dropout=0.0)  # False: random A and B, not B = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lm_head warnings of LM_HEAD_WARNINGS
        pm = peft.get_peft_model(hf, config)
        pm.save_pretrained(str(tmp_path / "peft"))

    model = ml.GPTModel.from_pretrained(base_folder, dtype="float64").eval()
    mpeft.load_peft_adapter(model, tmp_path / "peft")
    assert "h.0.attn.c_attn" in model.lora.targets and model.params["h.0.attn.c_attn.lora_B"].shape == (2, 48)
    assert model.params["h.1.mlp.c_fc.lora_A"].shape == (16, 4)
    idx, y = torch.tensor(IDX), np.random.default_rng(3).integers(0, TINY.vocab_size, IDX.shape)

    tl = pm(idx).logits
    logits = model.forward(IDX)
    np.testing.assert_allclose(logits, tl.detach().numpy(), rtol=0, atol=F64_TOL)
    loss, dlogits = cross_entropy(logits, y)
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, TINY.vocab_size), torch.tensor(y).reshape(-1))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    grads = model.backward(dlogits)
    lr = 0.5
    torch_params = dict(pm.named_parameters())
    for name in model.lora.param_names:
        prefix, part = name.rsplit(".", 1)
        module = prefix if prefix == "lm_head" else "transformer." + prefix
        tp = torch_params[f"base_model.model.{module}.{part}.default.weight"]
        np.testing.assert_allclose(grads[name], tp.grad.numpy().T, rtol=1e-9, atol=1e-12, err_msg=name)
        model.params[name] -= lr * grads[name]  # plain SGD on both sides
        with torch.no_grad():
            tp -= lr * tp.grad
        np.testing.assert_allclose(model.params[name], tp.detach().numpy().T, rtol=0, atol=1e-12, err_msg=name)
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(IDX), pm(idx).logits.numpy(), rtol=0, atol=F64_TOL)


def test_lora_dropout_and_a_float32_peft_adapter(tmp_path, base_folder):
    torch, transformers, peft = libs()
    hf = hf_model(base_folder, "float32", transformers, torch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.25,
                             init_lora_weights=False)
    pm = peft.get_peft_model(hf, config).eval()  # eval: PEFT's dropout off, as minilora's
    pm.save_pretrained(str(tmp_path / "peft"))
    model = ml.GPTModel.from_pretrained(base_folder).eval()
    loaded = mpeft.load_peft_adapter(model, tmp_path / "peft")
    assert model.lora.dropout == loaded["dropout"] == 0.25
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(IDX), pm(torch.tensor(IDX)).logits.numpy(), rtol=0, atol=F32_TOL)


def test_a_minilora_export_reads_back_exactly_without_torch(tmp_path, base_folder):
    """Q/K/V come back as one adapter over all of c_attn: the same logits (float64:
    the sums are the same up to rounding), and the other adapters bit for bit."""
    model = adapted(base_folder, dtype="float64", scaling="rslora")
    ml.export_peft(model, tmp_path / "peft")
    back = ml.GPTModel.from_pretrained(base_folder, dtype="float64").eval()
    config = mpeft.load_peft_adapter(back, tmp_path / "peft")
    assert config["format"] == mpeft.FORMAT and config["scaling"] == "alpha_over_r"
    assert config["targets"][:2] == ["h.0.attn.c_attn", "h.0.attn.c_proj"]
    np.testing.assert_allclose(back.forward(IDX), model.forward(IDX), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back.params["h.1.mlp.c_fc.lora_A"], model.params["h.1.mlp.c_fc.lora_A"])


def test_adapters_of_their_own_rank_and_the_whole_c_attn_site_pass_gradcheck(tmp_path, base_folder):
    """What an imported rank_pattern / alpha_pattern gives: each adapter its own scale,
    and the backward of every site (the one over all of c_attn too) right."""
    model = adapted(base_folder, dtype="float64", targets=["c_attn", "c_fc"], rank=2, alpha=3,
                    ranks={"h.0.mlp.c_fc": 4}, alphas={"h.1.attn.c_attn": 5})
    assert model.lora.config()["ranks"] == {"h.0.mlp.c_fc": 4}
    s = {ad.prefix: ad.scale for ad in model.lora.adapters}
    assert (s["h.0.mlp.c_fc"], s["h.1.attn.c_attn"], s["h.0.attn.c_attn"]) == (3 / 4, 5 / 2, 3 / 2)
    r = check_model(model, IDX[:, :5], "gpt2_lora")  # the whole c_attn site's backward too
    assert r.max_rel_error < MODEL_TOL, r.errors


def test_load_adapter_recognises_a_peft_folder(tmp_path, base_folder):
    model = adapted(base_folder, dtype="float64")
    ml.export_peft(model, tmp_path / "peft")
    back = ml.GPTModel.from_pretrained(base_folder, dtype="float64").eval()
    config = ml.load_adapter(back, tmp_path / "peft")
    assert config["format"] == mpeft.FORMAT
    np.testing.assert_allclose(back.forward(IDX), model.forward(IDX), rtol=0, atol=1e-12)
    from minilora.adapters import read_adapter

    assert read_adapter(tmp_path / "peft")[0]["targets"] == config["targets"]


def test_minilora_saves_an_imported_adapter_with_its_own_ranks(tmp_path, base_folder):
    model = adapted(base_folder, dtype="float64", targets=["c_attn", "c_fc"], ranks={"h.0.mlp.c_fc": 4})
    ml.save_adapter(model, tmp_path / "mine")
    back = ml.GPTModel.from_pretrained(base_folder, dtype="float64").eval()
    ml.load_adapter(back, tmp_path / "mine")
    np.testing.assert_array_equal(back.forward(IDX), model.forward(IDX))


# ---------------------------------------------------------------------------- merged checkpoints


def test_a_merged_export_runs_in_transformers_to_the_same_logits_and_continuation(tmp_path, base_folder):
    torch, transformers, _ = libs()
    model = adapted(base_folder)  # every linear and the tied LM head
    before = snapshot(model)
    folder = export_merged(model, tmp_path / "merged")
    assert_unchanged(model, before)  # folded on copies
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert load_file(folder / "model.safetensors")["lm_head.weight"].shape == (TINY.vocab_size, TINY.emb_dim)
    hf = hf_model(folder, "float32", transformers, torch)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(IDX)).logits.numpy(), model.forward(IDX), rtol=0, atol=F32_TOL)
        prompt = torch.tensor(IDX[:1])  # every token real: else generate masks those equal to pad_token_id
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None).numpy()
    from minilora.generate import generate

    np.testing.assert_array_equal(theirs, generate(model, IDX[:1], 12))


def test_a_merged_language_model_without_a_head_adapter_stays_tied(tmp_path, base_folder):
    model = adapted(base_folder, targets="attention")
    folder = export_merged(model, tmp_path / "merged")
    assert "tie_word_embeddings" not in json.loads((folder / "config.json").read_text())
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")


def test_a_merged_classifier_keeps_its_head_as_out_head(tmp_path, base_folder):
    """transformers reads the trunk; x_last @ out_head.weight + out_head.bias is minilora's logit."""
    torch, transformers, _ = libs()
    model = adapted(base_folder, classes=2)  # every linear and out_head
    folder = export_merged(model, tmp_path / "merged", settings={"class_names": ["ham", "spam"], "pool": "last"})
    note = json.loads((folder / "config.json").read_text())["minilora"]
    assert (note["head"], note["num_classes"], note["class_names"], note["pool"]) == ("out_head", 2, ["ham", "spam"],
                                                                                       "last")
    tensors = load_file(folder / "model.safetensors")
    trunk = transformers.GPT2Model.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        x = trunk(torch.tensor(IDX)).last_hidden_state[:, -1].numpy()
    logits = x @ tensors["out_head.weight"] + tensors["out_head.bias"]
    np.testing.assert_allclose(logits, model.forward(IDX)[:, -1], rtol=0, atol=F32_TOL)


def test_minilora_reads_back_a_merged_head(tmp_path, base_folder):
    model = adapted(base_folder)
    back = ml.GPTModel.from_pretrained(export_merged(model, tmp_path / "merged")).eval()
    np.testing.assert_allclose(back.forward(IDX), model.forward(IDX), rtol=0, atol=F32_TOL)


def test_minilora_reads_back_a_merged_classifier(tmp_path, base_folder):
    model = adapted(base_folder, classes=2)
    back = ml.GPTModel.from_pretrained(export_merged(model, tmp_path / "merged")).eval()
    np.testing.assert_allclose(back.forward(IDX), model.forward(IDX), rtol=0, atol=F32_TOL)


# ---------------------------------------------------------------------------- the command


def test_minilora_export_writes_what_peft_loads(tmp_path, base_folder, capsys):
    model = adapted(base_folder)
    ml.save_adapter(model, tmp_path / "adapter", base_model=str(base_folder))
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    libs()
    logits, _ = peft_logits(base_folder, tmp_path / "peft")
    np.testing.assert_allclose(logits, model.forward(IDX), rtol=0, atol=F32_TOL)


def test_minilora_export_merged_writes_what_transformers_loads(tmp_path, base_folder):
    model = adapted(base_folder)
    ml.save_adapter(model, tmp_path / "adapter", base_model=str(base_folder))
    assert main(["export", str(tmp_path / "adapter"), "--merged", "--out", str(tmp_path / "merged")]) == 0
    torch, transformers, _ = libs()
    hf = hf_model(tmp_path / "merged", "float32", transformers, torch)
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(IDX)).logits.numpy(), model.forward(IDX), rtol=0, atol=F32_TOL)


# ---------------------------------------------------------------------------- refusals


def one_line(message):
    assert "\n" not in message, message
    return message


def test_a_classifier_is_not_exported_to_peft(tmp_path, base_folder, capsys):
    model = adapted(base_folder, classes=2)
    before = snapshot(model)
    with pytest.raises(mpeft.PeftError, match="no exact PEFT form.*bias.*last non-pad token.*--merged") as e:
        ml.export_peft(model, tmp_path / "peft")
    one_line(str(e.value))
    assert not (tmp_path / "peft").exists()
    assert_unchanged(model, before)
    ml.save_adapter(model, tmp_path / "adapter", base_model=str(base_folder))
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no exact PEFT form" in err
    assert not (tmp_path / "peft").exists()


def test_export_refuses_a_folder_holding_other_files(tmp_path, base_folder):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(mpeft.PeftError, match="holds other files"):
        ml.export_peft(adapted(base_folder), tmp_path / "out")
    with pytest.raises(mpeft.PeftError, match="holds other files"):
        export_merged(adapted(base_folder), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def peft_folder(tmp_path, base_folder, name="peft"):
    """A valid PEFT folder (written by export_peft: no torch needed) to damage."""
    return ml.export_peft(adapted(base_folder, targets=["c_attn.q", "c_fc", "lm_head"]), tmp_path / name)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


W = "base_model.model."
REFUSALS = {
    "DoRA": (lambda f: edit_config(f, use_dora=True), "use_dora True: DoRA"),
    "bias all": (lambda f: edit_config(f, bias="all"), "bias 'all'"),
    "modules_to_save": (lambda f: edit_config(f, modules_to_save=["score"]), "modules_to_save"),
    "Llama": (lambda f: (edit_config(f, target_modules=["q_proj", "v_proj"],
                                     base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
                         edit_tensors(f, lambda t: t.update({
                             W + "model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 4096), np.float32)}))),
              "select no layer of a 2-block GPT-2.*another architecture \\(meta-llama"),
    "embedding": (lambda f: edit_config(f, target_modules=["wte", "c_fc"]), "transformer.wte: embedding adapters"),
    "missing tensor": (lambda f: edit_tensors(f, lambda t: t.pop(W + "transformer.h.1.mlp.c_fc.lora_B.weight")),
                       "missing tensor base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"),
    "wrong shape": (lambda f: edit_tensors(f, lambda t: t.update({
        W + "transformer.h.0.mlp.c_fc.lora_A.weight": np.zeros((2, 15), np.float32)})),
        "h.0.mlp.c_fc.lora_A.weight has shape \\(2, 15\\), expected \\(2, 16\\)"),
    "rank_pattern disagrees": (lambda f: edit_config(f, rank_pattern={"mlp.c_fc": 3}),
                               "mlp.c_fc.lora_A.weight has shape \\(2, 16\\), expected \\(3, 16\\) \\(rank 3 from "
                               "rank_pattern"),
    "unexpected tensor": (lambda f: edit_tensors(f, lambda t: t.update({
        W + "transformer.h.0.mlp.c_proj.lora_A.weight": np.zeros((2, 64), np.float32)})),
        "unexpected tensor base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"),
    "NaN": (lambda f: edit_tensors(f, lambda t: t[W + "lm_head.lora_B.weight"].__setitem__((0, 0), np.nan)),
            "lm_head.lora_B.weight holds NaN"),
    "another PEFT type": (lambda f: edit_config(f, peft_type="IA3"), "peft_type: expected one of \"LORA\""),
    "changed embedding": (lambda f: edit_tensors(f, lambda t: t.update({
        W + "lm_head.base_layer.weight": np.ones((100, 16), np.float32)})), "differs from this model's wte"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_what_minilora_cannot_read_exactly_is_refused_in_one_line(tmp_path, base_folder, case):
    damage, message = REFUSALS[case]
    folder = peft_folder(tmp_path, base_folder)
    damage(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = ml.GPTModel.from_pretrained(base_folder)
    before = snapshot(model)
    with pytest.raises(ml.AdapterError, match=message) as e:
        mpeft.load_peft_adapter(model, folder)
    one_line(str(e.value))
    assert model.lora is None and model.trainable == list(before)
    assert_unchanged(model, before)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # nothing written


# PEFT's config as a whole: each key of the types LoraConfig declares, each regular expression one
# Python reads; else one line naming adapter_config.json and the key (once: re.error and TypeError
# tracebacks, or a shape error blaming the tensor file)
CONFIG_TYPES = {
    "rank_pattern key not a regex": ({"rank_pattern": {"c_fc[": 4}}, "rank_pattern.c_fc[",
                                     "not a regular expression Python reads (unterminated character set)"),
    "rank_pattern value a string": ({"rank_pattern": {"mlp.c_fc": "2"}}, "rank_pattern.mlp.c_fc",
                                    'expected an integer >= 1, found "2"'),
    "alpha_pattern value 0": ({"alpha_pattern": {"lm_head": 0}}, "alpha_pattern.lm_head",
                              "expected a finite number > 0, found 0"),
    "layers_to_transform a string": ({"layers_to_transform": "0"}, "layers_to_transform",
                                     "expected an integer >= 0 or a list of them, or null; found '0'"),
    "layers_pattern a number": ({"layers_to_transform": [0], "layers_pattern": 5}, "layers_pattern",
                                "expected a string or a list of them, or null; found 5"),
    "layers_pattern not a regex": ({"layers_to_transform": [0], "layers_pattern": "h["}, "layers_pattern",
                                   "not a regular expression Python reads"),
    "exclude_modules a number": ({"exclude_modules": 5}, "exclude_modules",
                                 "expected a string or a list of them, or null; found 5"),
    "target_modules numbers": ({"target_modules": ["c_fc", 3]}, "target_modules",
                               "expected a string or a list of them, or null; found ['c_fc', 3]"),
    "target_modules not a regex": ({"target_modules": "(c_attn"}, "target_modules",
                                   "not a regular expression Python reads"),
}


@pytest.mark.parametrize("case", CONFIG_TYPES, ids=list(CONFIG_TYPES))
def test_a_peft_config_of_the_wrong_types_is_refused_naming_the_key(tmp_path, base_folder, case):
    change, key, problem = CONFIG_TYPES[case]
    folder = peft_folder(tmp_path, base_folder)
    edit_config(folder, **change)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = ml.GPTModel.from_pretrained(base_folder)
    before = snapshot(model)
    with pytest.raises(mpeft.PeftError) as e:
        ml.load_adapter(model, folder)
    message = one_line(str(e.value))
    assert message.startswith(f"{folder / 'adapter_config.json'}: {key}: {problem}"), message
    assert model.lora is None and model.trainable == list(before)
    assert_unchanged(model, before)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_generate_with_a_peft_pattern_that_is_no_regex_is_one_line(tmp_path, base_folder, capsys):
    folder = peft_folder(tmp_path, base_folder)
    edit_config(folder, rank_pattern={"c_fc[": 4})
    assert main(["generate", "--adapter", str(folder), "--model", str(base_folder), "--offline", "Hi"]) == 1
    assert error_line(capsys).startswith(f"minilora generate: error: {folder / 'adapter_config.json'}: "
                                         f"rank_pattern.c_fc[: not a regular expression")


def test_a_float16_copy_of_the_token_table_is_compared_in_float16(tmp_path, base_folder):
    """PEFT saves lm_head.base_layer.weight in the dtype the model was trained in: a
    float16 GPT-2's copy is this wte rounded to float16 (the same table, refused before
    as "max difference 3.05e-05"), and one float16 step off is another table."""
    folder = peft_folder(tmp_path, base_folder)
    wte = load_file(base_folder / "model.safetensors")["wte.weight"]
    copy = wte.astype(np.float16)
    assert not np.array_equal(copy.astype(np.float32), wte)  # the rounding is real
    edit_tensors(folder, lambda t: t.update({W + "lm_head.base_layer.weight": copy}))
    model = ml.GPTModel.from_pretrained(base_folder)
    mpeft.load_peft_adapter(model, folder)
    assert "lm_head" in model.lora.targets

    off = copy.copy()
    off[3, 5] = np.nextafter(off[3, 5], np.float16(1))
    edit_tensors(folder, lambda t: t.update({W + "lm_head.base_layer.weight": off}))
    model = ml.GPTModel.from_pretrained(base_folder)
    with pytest.raises(mpeft.PeftError, match="differs from this model's wte \\(max difference .* in float16\\)"):
        mpeft.load_peft_adapter(model, folder)
    assert model.lora is None


def test_a_peft_adapter_trained_on_a_float16_gpt2_with_lm_head_loads(tmp_path, base_folder):
    """The real PEFT file of the issue: GPT2LMHeadModel in float16, c_attn and lm_head
    targeted; its lm_head.base_layer.weight is float16. A float32 minilora model loads it
    and keeps its own float32 wte (equal to the copy in float16), so its logits are PEFT's
    with the same adapter on the float32 base: compared without the copy, which PEFT
    would load into the tied table, rounding wte to float16 (~5e-5 on these logits)."""
    torch, transformers, peft = libs()
    hf16 = transformers.GPT2LMHeadModel.from_pretrained(str(base_folder), dtype=torch.float16)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lm_head warnings of LM_HEAD_WARNINGS
        peft.get_peft_model(hf16, config).save_pretrained(str(tmp_path / "peft"))
    assert load_file(tmp_path / "peft" / "adapter_model.safetensors")[
        W + "lm_head.base_layer.weight"].dtype == np.float16
    model = ml.GPTModel.from_pretrained(base_folder).eval()
    ml.load_adapter(model, tmp_path / "peft")
    alone = shutil.copytree(tmp_path / "peft", tmp_path / "adapter-alone")
    edit_tensors(alone, lambda t: t.pop(W + "lm_head.base_layer.weight"))
    logits, _ = peft_logits(base_folder, alone)
    np.testing.assert_allclose(model.forward(IDX), logits, rtol=0, atol=F32_TOL)


def test_the_damaged_folders_are_complete_without_the_damage(tmp_path, base_folder):
    """The fixture the refusals damage loads, so each refusal is its damage's."""
    model = ml.GPTModel.from_pretrained(base_folder)
    mpeft.load_peft_adapter(model, peft_folder(tmp_path, base_folder))
    assert model.lora.targets == ["h.0.mlp.c_fc", "h.0.attn.c_attn", "h.1.mlp.c_fc", "h.1.attn.c_attn", "lm_head"]


def test_a_pickled_peft_adapter_is_named(tmp_path, base_folder):
    folder = peft_folder(tmp_path, base_folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ml.AdapterError, match="adapter_model.bin is a PyTorch pickle.*safe_serialization"):
        mpeft.load_peft_adapter(ml.GPTModel.from_pretrained(base_folder), folder)
    assert ml.adapters.holds_peft_adapter(folder)


# ---------------------------------------------------------------------------- the site over all of c_attn


def test_the_whole_c_attn_site_is_chosen_only_by_its_name():
    """"all" and patterns that match Q, K or V keep the book's three adapters (as before the
    site existed); "c_attn" or a block's full name is the one adapter over all of Q|K|V."""
    from minilora.lora import config_sites, select_targets

    sites = config_sites(TINY)
    assert sites["h.0.attn.c_attn"] == ("h.0.attn.c_attn", slice(None), 16, 48)
    every = select_targets(sites, 2, "all")
    assert "h.0.attn.c_attn" not in every and len(every) == 2 * 6 + 1
    assert select_targets(sites, 2, "*c_attn*") == [f"h.{i}.attn.c_attn.{p}" for i in range(2) for p in "qkv"]
    assert select_targets(sites, 2, "c_attn") == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert select_targets(sites, 2, ["h.1.attn.c_attn"]) == ["h.1.attn.c_attn"]
    assert select_targets(sites, 2, "c_attn", layers=[1]) == ["h.1.attn.c_attn"]


def test_ranks_and_alphas_name_targets_only(base_folder):
    model = ml.GPTModel.from_pretrained(base_folder)
    with pytest.raises(ValueError, match="ranks name 'h.0.mlp.c_fc', which is not among the targets"):
        ml.apply_lora(model, targets=["c_attn"], ranks={"h.0.mlp.c_fc": 4})
    with pytest.raises(ValueError, match="rank 17 exceeds the model width 16"):
        ml.apply_lora(model, rank=2, targets=["c_attn"], ranks={"h.0.attn.c_attn": 17})
    assert model.lora is None and "h.0.attn.c_attn.lora_A" not in model.params


def test_minilora_imports_no_torch_for_peft_or_export():
    import subprocess
    import sys

    code = "import sys, minilora, minilora.peft, minilora.export, minilora.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_a_full_module_name_as_a_pattern_key_matches_that_module_alone():
    """rank_pattern / alpha_pattern keys are regular expressions in PEFT; export writes full
    names unescaped, which is exact only if no other module name matches one."""
    import re

    names = mpeft._gpt2_module_names(12)
    for key in names:
        hits = [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
        assert hits == [key], (key, hits)


def test_a_head_of_its_own_merges_into_itself_and_survives_unmerge(base_folder):
    """A model read from an untied checkpoint (a merged export read back) has lm_head.weight
    before any LoRA: merging adds into it, unmerging takes it away, and it stays."""
    model = ml.GPTModel.from_pretrained(base_folder, dtype="float64").eval()
    own = np.random.default_rng(5).normal(0, 0.02, (TINY.emb_dim, TINY.vocab_size))
    model.params["lm_head.weight"] = own.copy()
    ml.apply_lora(model, rank=2, alpha=3, targets=["lm_head"])
    model.params["lm_head.lora_B"][...] = np.random.default_rng(6).normal(0, 0.3, (2, TINY.vocab_size))
    adapted_logits = model.forward(IDX)
    ml.merge_lora(model)
    np.testing.assert_allclose(model.forward(IDX), adapted_logits, rtol=0, atol=1e-12)
    ml.remove_lora(model)
    np.testing.assert_allclose(model.params["lm_head.weight"], own, rtol=0, atol=1e-15)
