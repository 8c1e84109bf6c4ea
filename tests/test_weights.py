"""Hugging Face GPT-2 checkpoints: written by the tests in the real layout, loaded,
checked against an independent forward, and every broken variant a clear error."""

import json
import math

import numpy as np
import pytest

import minilora as ml
from minilora.download import DownloadError
from minilora.export import export_merged
from minilora.weights import CheckpointError, read_heads, save_pretrained, write_checkpoint

CFG = ml.GPTConfig(vocab_size=19, context_length=9, emb_dim=12, n_heads=3, n_layers=2)


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.1) + (1.0 if ".ln_" in n and n.endswith("weight")
                                                                           else 0.0)
            for n, s in ml.config.param_shapes(cfg).items()}


def plain_gpt2(P, idx, n_layers, n_heads):
    """picoGPT-style GPT-2 forward, written here from the equations, numpy only."""
    def ln(x, w, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    T = idx.shape[1]
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    mask = np.triu(np.full((T, T), -1e10), 1)
    for i in range(n_layers):
        h = f"h.{i}."
        qkv = ln(x, P[h + "ln_1.weight"], P[h + "ln_1.bias"]) @ P[h + "attn.c_attn.weight"] + P[h + "attn.c_attn.bias"]
        heads = [np.split(t, n_heads, axis=-1) for t in np.split(qkv, 3, axis=-1)]
        outs = []
        for q, k, v in zip(*heads):
            s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]) + mask
            w = np.exp(s - s.max(-1, keepdims=True))
            outs.append((w / w.sum(-1, keepdims=True)) @ v)
        x = x + np.concatenate(outs, -1) @ P[h + "attn.c_proj.weight"] + P[h + "attn.c_proj.bias"]
        m = gelu(ln(x, P[h + "ln_2.weight"], P[h + "ln_2.bias"]) @ P[h + "mlp.c_fc.weight"] + P[h + "mlp.c_fc.bias"])
        x = x + m @ P[h + "mlp.c_proj.weight"] + P[h + "mlp.c_proj.bias"]
    return ln(x, P["ln_f.weight"], P["ln_f.bias"]) @ P["wte.weight"].T


def hf_folder(tmp_path, params=None, prefix="transformer.", config=None, name="ckpt"):
    folder = tmp_path / name
    folder.mkdir()
    params = random_params(CFG) if params is None else params
    write_checkpoint(params, folder / "model.safetensors", prefix=prefix, buffers=True)
    (folder / "config.json").write_text(json.dumps(config or ml.weights.config_to_hf(CFG)))
    return folder


IDX = np.array([[1, 4, 4, 18, 0, 7], [3, 3, 2, 9, 11, 4]])


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loaded_model_reproduces_an_independent_forward(tmp_path, prefix, device):
    params = random_params(CFG)
    folder = hf_folder(tmp_path, params, prefix=prefix)
    expected = plain_gpt2(params, IDX, CFG.n_layers, CFG.n_heads)
    for source in (folder, folder / "model.safetensors"):
        model = ml.GPTModel.from_pretrained(source, dtype="float64", device=device)
        assert model.cfg == CFG and set(model.trainable) == set(model.params)
        np.testing.assert_allclose(ml.to_numpy(model.forward(IDX)), expected, rtol=1e-11, atol=1e-11)


def test_buffers_skipped_but_c_attn_bias_kept(tmp_path):
    model = ml.GPTModel.from_pretrained(hf_folder(tmp_path), dtype="float64")
    assert "h.0.attn.c_attn.bias" in model.params and "h.0.attn.bias" not in model.params


def test_float32_loading_and_round_trip(tmp_path):
    model = ml.GPTModel.from_pretrained(hf_folder(tmp_path), dtype="float32")
    assert all(p.dtype == np.float32 for p in model.params.values())
    save_pretrained(model, tmp_path / "again")
    again = ml.GPTModel.from_pretrained(tmp_path / "again", dtype="float32")
    assert all(np.array_equal(again.params[n], model.params[n]) for n in model.params)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["n_head"] == 3


def test_missing_extra_and_misshapen_tensors_are_listed(tmp_path):
    params = random_params(CFG)
    del params["h.1.mlp.c_fc.bias"]
    params["h.0.ln_2.weight"] = np.ones(5)
    params["h.0.extra.weight"] = np.ones(3)
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(hf_folder(tmp_path, params))
    msg = str(e.value)
    assert "\n" not in msg  # one line, as every error the command line prints
    assert "missing (1): h.1.mlp.c_fc.bias" in msg
    assert "unexpected (1): h.0.extra.weight" in msg
    assert "wrong shape (1): h.0.ln_2.weight (5,) != (12,)" in msg


def test_truncated_and_foreign_files(tmp_path):
    folder = hf_folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ml.GPTModel.from_pretrained(folder)
    (folder / "model.safetensors").write_text("<html>404 Not Found</html>" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ml.GPTModel.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        ml.GPTModel.from_pretrained(folder)


def test_config_that_disagrees_with_the_tensors(tmp_path):
    bad = {**ml.weights.config_to_hf(CFG), "n_embd": 24, "n_layer": 3}
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(hf_folder(tmp_path, config=bad))
    assert "\n" not in str(e.value)
    assert "emb_dim: config says 24, tensors say 12" in str(e.value)
    assert "n_layers: config says 3, tensors say 2" in str(e.value)


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*gpt2-small"):
        ml.GPTModel.from_pretrained("gpt5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        ml.GPTModel.from_pretrained(tmp_path / "empty")


def test_preset_download_through_a_local_server(empty_minilora_home, local_http_server, monkeypatch, tmp_path):
    """The real download path of a preset, served from 127.0.0.1: a file that is not
    gpt2-small's shape is refused after the download, with a clear message."""
    monkeypatch.setenv("MINILORA_HF_ENDPOINT", local_http_server.url("").rstrip("/"))
    monkeypatch.setattr(ml.weights, "KNOWN_SIZES", {})  # our tiny file is not 548 MB
    body = write_checkpoint(random_params(CFG), tmp_path / "model.safetensors").read_bytes()
    local_http_server.add("/openai-community/gpt2/resolve/main/model.safetensors", body)
    with pytest.raises(CheckpointError, match="vocab_size: config says 50257, tensors say 19"):
        ml.GPTModel.from_pretrained("gpt2-small")
    cached = empty_minilora_home / "models" / "gpt2-small" / "model.safetensors"
    assert cached.read_bytes() == body
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline"):
        ml.GPTModel.from_pretrained("gpt2-medium")


def test_model_url_downloads_weights_and_config(empty_minilora_home, local_http_server, tmp_path):
    folder = hf_folder(tmp_path)
    url = local_http_server.add("/tiny/model.safetensors", (folder / "model.safetensors").read_bytes())
    local_http_server.add("/tiny/config.json", (folder / "config.json").read_bytes())
    model = ml.GPTModel.from_pretrained(url, dtype="float64")
    assert model.cfg == CFG
    requests = len(local_http_server.requests)
    ml.GPTModel.from_pretrained(url, dtype="float64", offline=True)  # from the cache, no request
    assert len(local_http_server.requests) == requests


# ---------------------------------------------------------------------------- what save_pretrained writes


def merged(tmp_path, name, classes=None, targets="all"):
    """The folder of a merged export (minilora.export) of a CFG model with LoRA (random B, so
    that the adapters change the weights): a classifier's with out_head.*, else an untied LM
    head when the head carries an adapter."""
    model = ml.GPTModel.from_pretrained(hf_folder(tmp_path, name=name + "-base"), dtype="float64")
    if classes:
        model.replace_head(classes)
    ml.apply_lora(model, rank=2, alpha=2, targets=targets)
    rng = np.random.default_rng(3)
    for n in model.lora.param_names:
        if n.endswith("lora_B"):
            model.params[n][...] = rng.normal(0, 0.1, model.params[n].shape)
    return export_merged(model, tmp_path / name)


@pytest.mark.parametrize("classes", [None, 2], ids=["untied language model", "classifier"])
def test_a_merged_model_read_back_saves_as_the_same_model(tmp_path, classes):
    """Before: an untied head was refused ("unmerge_lora(model) before save_pretrained", with
    no LoRA to unmerge) and a classifier's out_head.* dropped, written as a language model."""
    model = ml.GPTModel.from_pretrained(merged(tmp_path, "merged", classes), dtype="float64")
    assert model.lora is None and ("out_head.weight" if classes else "lm_head.weight") in model.params
    save_pretrained(model, tmp_path / "again")
    again = ml.GPTModel.from_pretrained(tmp_path / "again", dtype="float64")
    assert list(again.params) == list(model.params)
    np.testing.assert_array_equal(again.forward(IDX), model.forward(IDX))
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is (classes is not None)
    assert ("minilora" in config) is (classes is not None)


@pytest.mark.parametrize("classes", [None, 2], ids=["untied language model", "classifier"])
def test_save_pretrained_and_export_merged_write_the_same_files(tmp_path, classes):
    """One writer of the Hub's layout: a model without adapters comes out the same either way."""
    model = ml.GPTModel.from_pretrained(merged(tmp_path, "merged", classes), dtype="float64")
    save_pretrained(model, tmp_path / "saved")
    export_merged(model, tmp_path / "exported")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "exported" / name).read_bytes()


def test_save_pretrained_refuses_merged_adapters_naming_both_ways_out(tmp_path):
    """Merged adapters on attention only: once written silently as if they were the base weights."""
    model = ml.GPTModel.from_pretrained(hf_folder(tmp_path), dtype="float64")
    ml.apply_lora(model, rank=2, alpha=2, targets="attention")
    ml.merge_lora(model)
    with pytest.raises(CheckpointError) as e:
        save_pretrained(model, tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and "unmerge_lora(model)" in message and "export_merged(model, folder)" in message
    assert not (tmp_path / "out").exists()


def test_read_heads_tells_what_a_checkpoint_holds_without_reading_its_weights(tmp_path, empty_minilora_home,
                                                                               monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    assert read_heads("gpt2-small") == ()  # a preset: GPT-2's tied head, and no download
    assert read_heads(hf_folder(tmp_path)) == ()
    params = random_params(CFG)
    params["lm_head.weight"] = params["wte.weight"]  # a tied copy some exports store: wte is the head
    assert read_heads(hf_folder(tmp_path, params, name="tied-copy")) == ()
    assert read_heads(merged(tmp_path, "lm")) == ("lm_head.weight",)
    assert read_heads(merged(tmp_path, "classifier", classes=2)) == ("out_head.weight", "out_head.bias")
    monkeypatch.setattr(ml.weights, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    assert read_heads(tmp_path / "lm" / "model.safetensors") == ("lm_head.weight",)
