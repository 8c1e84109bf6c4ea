"""Every file minilora reads is checked before it is trusted: Hugging Face's config.json,
the tensors of model.safetensors, an adapter's minilora_adapter.json and its tensors.

Each damaged file is met as a user meets it (the API call, or the command), and must be
refused in one line that names the file and the key or tensor, with nothing changed: not
the model, not the files on disk. Two property-style tests corrupt every field of the two
JSON kinds in turn (wrong type, missing, out of range, NaN where a number is). Tiny
models (C=8 or 12, or the real-vocabulary tiny_checkpoint for the command line), so each
test takes well under a second."""

import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import cli
from minilora.adapters import (CONFIG_FILE, FORMAT, MODEL_CONFIG_SCHEMA, OLD_CONFIG_FILE, WEIGHTS_FILE,
                               AdapterError, load_adapter, read_adapter, save_adapter)
from minilora.weights import CheckpointError, config_to_hf, write_checkpoint

from fixtures_weights import TINY_REAL_VOCAB
from cli_helpers import error_line

CFG = ml.GPTConfig(vocab_size=19, context_length=9, emb_dim=12, n_heads=3, n_layers=2)
MISSING = object()  # a change that deletes the key
NAN = float("nan")  # json.dumps writes it as NaN, as Python's own json module would
INF_TEXT = "__1e999__"  # written as the bare number 1e999, which JSON parsers read as infinity


@pytest.fixture
def offline(minilora_home, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    return minilora_home


# ----------------------------------------------------------------------------- helpers


def write_changed(path, change):
    """Rewrite the JSON file at `path` with `change` applied: {key: value}, a dotted key
    for a nested one ("model_config.emb_dim"), MISSING to delete the key, INF_TEXT for 1e999."""
    data = json.loads(Path(path).read_text())
    for key, value in change.items():
        *outer, last = key.split(".")
        target = data
        for k in outer:
            target = target[k]
        if value is MISSING:
            del target[last]
        else:
            target[last] = value
    text = json.dumps(data, indent=2, allow_nan=True).replace(f'"{INF_TEXT}"', "1e999")
    Path(path).write_text(text)
    return path


def one_line(error):
    """The message of a raised error, which must be a single line."""
    message = str(error.value)
    assert "\n" not in message, message
    return message


def names_file_and_key(message, path, key):
    """Whether `message` names the file and the key (a list item as key[i] counts)."""
    return str(path) in message and re.search(rf"(^|\s){re.escape(key)}(\[\d+\])?: ", message) is not None



def files_of(folder):
    """Every file under `folder` with its bytes: what 'nothing changed on disk' compares."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def snapshot(model):
    return {n: ml.to_numpy(p).copy() for n, p in model.params.items()}, list(model.trainable), model.lora


def assert_unchanged(model, before):
    params, trainable, lora = before
    assert model.lora is lora and list(model.trainable) == trainable and set(model.params) == set(params)
    assert all(np.array_equal(ml.to_numpy(model.params[n]), params[n]) for n in params)


def checkpoint_folder(tmp_path, params=None, config=None, name="ckpt"):
    """A Hugging Face style folder: model.safetensors (random CFG weights unless given) + config.json."""
    folder = tmp_path / name
    folder.mkdir()
    if params is None:
        params = {n: ml.to_numpy(p) for n, p in ml.GPTModel(CFG, seed=0).params.items()}
    write_checkpoint(params, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config or config_to_hf(CFG)))
    return folder


def classifier_adapter(folder, cfg, base_model=None, **settings):
    """A 2-class classifier's adapter of a `cfg` model (rank 2, B random so it does something),
    saved with every setting recorded. Returns the folder."""
    model = ml.GPTModel(cfg, seed=0).replace_head(2)
    ml.apply_lora(model, rank=2, alpha=2)
    rng = np.random.default_rng(1)
    for n in model.lora.param_names:
        if n.endswith("lora_B"):
            model.params[n][...] = rng.standard_normal(model.params[n].shape) * 0.1
    recorded = {"class_names": ["ham", "spam"], "max_length": 5, "pool": "last", "pad": "dataset",
                "batching": "shuffled", **settings}
    return save_adapter(model, folder, base_model=base_model, **recorded)


def change_tensor(path, name, edit):
    """Rewrite one tensor of a safetensors file: edit(array) returns its new value."""
    tensors = load_file(str(path))
    tensors[name] = edit(tensors[name].copy())
    save_file(tensors, str(path))


def put(value, index):
    def edit(a):
        a[index] = value
        return a
    return edit


@pytest.fixture
def adapter(tmp_path, tiny_cfg):
    return classifier_adapter(tmp_path / "adapter", tiny_cfg)


@pytest.fixture
def cli_adapter(tiny_checkpoint, tmp_path):
    """An adapter of the real-vocabulary tiny model, whose base_model says where that model is:
    what `minilora classify --adapter` runs on without --model."""
    return classifier_adapter(tmp_path / "cli-adapter", TINY_REAL_VOCAB, base_model=str(tiny_checkpoint),
                              max_length=20)


def classify(adapter_folder, text="WIN a FREE prize now"):
    return cli.main(["classify", "--adapter", str(adapter_folder), "--offline", text])


# ----------------------------------------------------------------------------- config.json (Hugging Face)


@pytest.mark.parametrize("key, value, found", [
    ("layer_norm_epsilon", "1e-5", '"1e-5"'),  # a string where a number belongs
    ("layer_norm_epsilon", None, "null"),
    ("n_embd", INF_TEXT, "inf"),  # 1e999 parses to infinity
    ("n_head", 2.7, "2.7"),  # once truncated to 2 heads: a different model, trained without a word
])
def test_a_config_json_with_a_bad_value_is_refused_naming_the_key(tmp_path, key, value, found):
    folder = checkpoint_folder(tmp_path)
    write_changed(folder / "config.json", {key: value})
    on_disk = files_of(folder)
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(folder)
    message = one_line(e)
    assert message.startswith(f"{folder / 'config.json'}: {key}: expected ") and message.endswith(f"found {found}")
    assert files_of(folder) == on_disk


def test_the_command_line_says_the_config_json_line_and_exits_1(offline, tiny_checkpoint, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))
    write_changed(folder / "config.json", {"n_head": 2.7})
    assert cli.main(["generate", "--model", str(folder), "--max-new-tokens", "1", "Hi"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"minilora generate: error: {folder / 'config.json'}: n_head: ") and "2.7" in line


def test_a_config_json_of_another_model_type_is_refused(tmp_path):
    folder = checkpoint_folder(tmp_path)
    write_changed(folder / "config.json", {"model_type": "llama"})
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(folder)
    assert names_file_and_key(one_line(e), folder / "config.json", "model_type") and "llama" in str(e.value)


@pytest.mark.parametrize("absent", [("model_type",), ("n_positions",), ("n_ctx",), ("layer_norm_epsilon",)])
def test_config_json_keys_gpt2config_defaults_may_be_absent(tmp_path, absent):
    """Hugging Face's GPT2Config writes model_type and layer_norm_epsilon, and n_positions or
    (older exports) n_ctx; a file without one still means GPT-2."""
    folder = checkpoint_folder(tmp_path)
    write_changed(folder / "config.json", {k: MISSING for k in absent})
    assert ml.GPTModel.from_pretrained(folder).cfg == CFG


def _hf_corruptions():
    """(key named in the error, change) for every field of HF_CONFIG_SCHEMA: wrong type,
    missing, out of range, NaN where a number is."""
    cases = [("model_type", {"model_type": 2}), ("model_type", {"model_type": "gpt_neo"})]
    for key in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_head", "n_layer"):
        cases += [(key, {key: value}) for value in ("12", 12.5, None, True, 0, -1, INF_TEXT, NAN)]
    for key in ("vocab_size", "n_embd", "n_head", "n_layer"):
        cases.append((key, {key: MISSING}))
    cases.append(("n_positions", {"n_positions": MISSING, "n_ctx": MISSING}))
    cases.append(("n_head", {"n_head": 5}))  # does not divide n_embd (12)
    cases += [("layer_norm_epsilon", {"layer_norm_epsilon": v}) for v in ("1e-5", None, 1e-6, 0, INF_TEXT, NAN)]
    return cases


@pytest.mark.parametrize("key, change", _hf_corruptions(), ids=lambda c: repr(c)[:40])
def test_every_corruption_of_config_json_is_refused(tmp_path, key, change):
    folder = checkpoint_folder(tmp_path)
    write_changed(folder / "config.json", change)
    on_disk = files_of(folder)
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(folder)
    message = one_line(e)
    assert names_file_and_key(message, folder / "config.json", key), message
    assert files_of(folder) == on_disk


# ----------------------------------------------------------------------------- model.safetensors


def _weights(cfg=CFG, dtype=np.float32):
    return {n: ml.to_numpy(p).astype(dtype) for n, p in ml.GPTModel(cfg, seed=0, dtype="float64").params.items()}


def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    params = _weights()
    params["h.1.mlp.c_fc.weight"][3, 7] = np.nan
    params["h.1.mlp.c_fc.weight"][5, 0] = np.nan
    folder = checkpoint_folder(tmp_path, params)
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(folder)
    size = params["h.1.mlp.c_fc.weight"].size
    assert one_line(e) == (f"{folder / 'model.safetensors'}: h.1.mlp.c_fc.weight holds NaN "
                           f"(2 of {size:,} values, the first at index (3, 7))")


def test_float16_weights_holding_inf_are_refused(tmp_path):
    """A float16 export whose large weights overflowed (float16 tops out at 65504) holds inf."""
    params = _weights(dtype=np.float16)
    params["wpe.weight"][2, 1] = np.inf  # what a weight above 65504 became in the float16 cast
    folder = checkpoint_folder(tmp_path, params)
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(folder, dtype="float32")
    assert one_line(e).startswith(f"{folder / 'model.safetensors'}: wpe.weight holds inf (1 of ")


def test_float64_weights_beyond_float32_are_refused_in_float32_only(tmp_path):
    params = _weights(dtype=np.float64)
    params["h.0.attn.c_proj.bias"][4] = 1e300  # finite in the file, inf once cast to float32
    folder = checkpoint_folder(tmp_path, params)
    with pytest.raises(CheckpointError) as e:
        ml.GPTModel.from_pretrained(folder, dtype="float32")
    message = one_line(e)
    assert message.startswith(f"{folder / 'model.safetensors'}: h.0.attn.c_proj.bias holds values beyond "
                              f"float32's range") and "float64" in message
    model = ml.GPTModel.from_pretrained(folder, dtype="float64")  # float64 holds it as it is
    assert model.params["h.0.attn.c_proj.bias"][4] == 1e300


def test_finetune_on_nan_weights_names_the_tensor_not_the_learning_rate(offline, tiny_checkpoint, tmp_path,
                                                                       capsys):
    params = load_file(str(tiny_checkpoint / "model.safetensors"))
    params["h.0.mlp.c_fc.weight"][0, 0] = np.nan
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(params, folder / "model.safetensors")
    shutil.copy(tiny_checkpoint / "config.json", folder)
    data = tmp_path / "d.csv"
    rows = [f"\"{'pizza pasta' if i % 2 else 'goal match'} number {i}\",{'food' if i % 2 else 'sport'}"
            for i in range(30)]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    rc = cli.main(["finetune", "--model", str(folder), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                   "--epochs", "1", "--rank", "2", "--batch-size", "4"])
    assert rc == 1
    line = error_line(capsys)
    assert f"{folder / 'model.safetensors'}: h.0.mlp.c_fc.weight holds NaN" in line and "learning rate" not in line
    assert not (tmp_path / "run" / "checkpoint").exists()


# ----------------------------------------------------------------------------- the adapter's config


def test_the_model_config_schema_holds_every_gptconfig_field():
    assert set(MODEL_CONFIG_SCHEMA.fields) == {f.name for f in fields(ml.GPTConfig)}


@pytest.mark.parametrize("change, key", [
    ({"rank": MISSING}, "rank"),  # printed "error: rank" (a KeyError's message) before
    ({"model_config": None}, "model_config"),
    ({"model_config": [8, 2]}, "model_config"),  # a list where an object belongs
    ({"class_names": ["ham"]}, "class_names"),  # shorter than num_classes
    ({"class_names": "ab"}, "class_names"),  # classify printed class "a" for a string
    ({"pool": "first"}, "pool"),  # an unknown pool ran as last_real, silently
    ({"pad": "none"}, "pad"),
    ({"max_length": -3}, "max_length"),
])
def test_a_bad_adapter_config_is_refused_and_the_model_is_unchanged(adapter, tiny_cfg, change, key):
    write_changed(adapter / CONFIG_FILE, change)
    model = ml.GPTModel(tiny_cfg, seed=0)
    before = snapshot(model)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter)
    assert names_file_and_key(one_line(e), adapter / CONFIG_FILE, key), str(e.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("change, key", [
    ({"rank": MISSING}, "rank"),
    ({"class_names": "ab"}, "class_names"),
    ({"pool": "first"}, "pool"),
    ({"model_config": None}, "model_config"),
])
def test_classify_with_a_bad_adapter_config_exits_1_with_one_line(offline, cli_adapter, capsys, change, key):
    write_changed(cli_adapter / CONFIG_FILE, change)
    assert classify(cli_adapter) == 1
    assert names_file_and_key(error_line(capsys), cli_adapter / CONFIG_FILE, key)
    assert capsys.readouterr().out == ""  # no class printed


def test_an_adapter_from_an_older_minilora_loads_with_defaults(offline, cli_adapter, tiny_cfg, adapter, capsys):
    """Before issue 20 the config was adapter_config.json, and the first versions wrote no
    class_names, max_length, pool, pad or batching: such an adapter still loads and runs."""
    later_keys = ("class_names", "max_length", "pool", "pad", "batching")
    for folder in (adapter, cli_adapter):
        write_changed(folder / CONFIG_FILE, {k: MISSING for k in later_keys})
        (folder / CONFIG_FILE).rename(folder / OLD_CONFIG_FILE)
    config = load_adapter(ml.GPTModel(tiny_cfg, seed=0), adapter)
    assert all(config[k] is None for k in later_keys) and config["rank"] == 2
    assert classify(cli_adapter) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("0", "1")  # no names recorded: the class ids


def _adapter_corruptions():
    """(key named in the error, change) for every field of the adapter config (tiny_cfg:
    emb_dim 8, context 7, two classes): wrong type, missing, out of range, NaN."""
    def number_cases(key, *bad):
        return [(key, {key: v}) for v in (*bad, INF_TEXT, NAN)]

    return [
        ("format", {"format": 1}), ("format", {"format": MISSING}), ("format", {"format": "minilora-lora/2"}),
        ("rank", {"rank": "2"}), ("rank", {"rank": MISSING}), ("rank", {"rank": True}),
        *number_cases("rank", 0, 2.5, 9),  # 9 > emb_dim
        ("alpha", {"alpha": "2"}), ("alpha", {"alpha": MISSING}), *number_cases("alpha", 0, -1),
        ("scaling", {"scaling": 1}), ("scaling", {"scaling": MISSING}), ("scaling", {"scaling": "alpha_squared"}),
        ("dropout", {"dropout": "0"}), ("dropout", {"dropout": MISSING}), *number_cases("dropout", -0.1, 1.0),
        ("targets", {"targets": "h.0.mlp.c_fc"}), ("targets", {"targets": MISSING}), ("targets", {"targets": []}),
        ("targets", {"targets": ["h.0.mlp.c_fc", 3]}),
        ("base_model", {"base_model": 3}), ("base_model", {"base_model": MISSING}),
        ("model_config", {"model_config": []}), ("model_config", {"model_config": MISSING}),
        ("model_config", {"model_config": None}), ("model_config", {"model_config": "gpt2-small"}),
        ("model_config.emb_dim", {"model_config.emb_dim": "8"}),
        ("model_config.emb_dim", {"model_config.emb_dim": MISSING}),
        *number_cases("model_config.emb_dim", 0),
        ("model_config.n_heads", {"model_config.n_heads": 3}),  # does not divide emb_dim
        *number_cases("model_config.drop_rate", 1.0, -0.5),
        ("model_config.qkv_bias", {"model_config.qkv_bias": 1}),
        ("model_config.n_embd", {"model_config.n_embd": 8}),  # Hugging Face's name: not a key here
        ("num_classes", {"num_classes": "2"}), ("num_classes", {"num_classes": MISSING}),
        *number_cases("num_classes", 1, 2.5),
        ("class_names", {"class_names": "ab"}), ("class_names", {"class_names": ["ham"]}),
        ("class_names", {"class_names": ["ham", 3]}), ("class_names", {"class_names": ["ham", "ham"]}),
        ("max_length", {"max_length": "5"}), *number_cases("max_length", 0, -3, 8),  # 8 > context 7
        ("pool", {"pool": 1}), ("pool", {"pool": "first"}),
        ("pad", {"pad": 1}), ("pad", {"pad": "none"}),
        ("batching", {"batching": 1}), ("batching", {"batching": "sorted"}),
        ("ranks", {"ranks": [2]}), ("alphas", {"alphas": "4"}),
        ("ranks.h.9.mlp.c_fc", {"ranks": {"h.9.mlp.c_fc": 2}}),  # not one of the targets
        ("ranks.h.0.mlp.c_fc", {"ranks": {"h.0.mlp.c_fc": 0}}), ("ranks.h.0.mlp.c_fc", {"ranks": {"h.0.mlp.c_fc": 9}}),
        ("ranks.h.0.mlp.c_fc", {"ranks": {"h.0.mlp.c_fc": "2"}}), ("alphas.out_head", {"alphas": {"out_head": -1}}),
        ("epochs", {"epochs": 3}),  # a key minilora never writes
    ]


@pytest.mark.parametrize("key, change", _adapter_corruptions(), ids=lambda c: repr(c)[:40])
def test_every_corruption_of_an_adapter_config_is_refused(adapter, tiny_cfg, key, change):
    write_changed(adapter / CONFIG_FILE, change)
    on_disk = files_of(adapter)
    model = ml.GPTModel(tiny_cfg, seed=0)
    before = snapshot(model)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter)
    message = one_line(e)
    assert names_file_and_key(message, adapter / CONFIG_FILE, key), message
    assert_unchanged(model, before)
    assert files_of(adapter) == on_disk


def test_adapters_with_ranks_of_their_own_round_trip(tmp_path, tiny_cfg, tiny_idx):
    import inspect

    if "ranks" not in inspect.signature(ml.apply_lora).parameters:
        pytest.skip("apply_lora takes no per-adapter ranks yet")
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64").replace_head(2)
    ml.apply_lora(model, rank=2, alpha=2, ranks={"h.0.mlp.c_fc": 4}, alphas={"out_head": 8})
    model.params["h.0.mlp.c_fc.lora_B"][...] = 0.1
    save_adapter(model, tmp_path / "a")
    fresh = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    config = load_adapter(fresh, tmp_path / "a")
    assert config["ranks"] == {"h.0.mlp.c_fc": 4} and fresh.params["h.0.mlp.c_fc.lora_A"].shape == (8, 4)
    np.testing.assert_array_equal(fresh.forward(tiny_idx), model.forward(tiny_idx))


def test_an_adapter_of_numpy_scalar_settings_saves_and_loads(tmp_path, tiny_cfg, tiny_idx):
    """apply_lora takes NumPy numbers (an int64 rank, a float32 alpha); save_adapter once
    failed in json.dumps ("Object of type int64 is not JSON serializable")."""
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64").replace_head(2)
    ml.apply_lora(model, rank=np.int64(2), alpha=np.float32(2.5), dropout=np.float32(0.25))
    model.params["h.0.mlp.c_fc.lora_B"][...] = 0.1
    save_adapter(model, tmp_path / "a", max_length=np.int64(5))
    fresh = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    config = load_adapter(fresh, tmp_path / "a")
    assert (config["rank"], config["alpha"], config["dropout"], config["max_length"]) == (2, 2.5, 0.25, 5)
    np.testing.assert_array_equal(fresh.eval().forward(tiny_idx), model.eval().forward(tiny_idx))


def test_a_config_that_is_not_an_object_is_refused(adapter, tiny_cfg):
    (adapter / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(AdapterError) as e:
        read_adapter(adapter)
    assert one_line(e).startswith(f"{adapter / CONFIG_FILE}") and "expected an object" in str(e.value)


# ----------------------------------------------------------------------------- the adapter's tensors


def test_nan_in_an_adapter_tensor_names_it(adapter, tiny_cfg):
    change_tensor(adapter / WEIGHTS_FILE, "h.0.mlp.c_fc.lora_B", put(np.nan, (1, 3)))
    model = ml.GPTModel(tiny_cfg, seed=0)
    before = snapshot(model)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter)
    message = one_line(e)
    assert message.startswith(f"{adapter / WEIGHTS_FILE} ({FORMAT}): h.0.mlp.c_fc.lora_B holds NaN (1 of 64 values, "
                              f"the first at index (1, 3))")
    assert_unchanged(model, before)


def test_classify_with_nan_adapter_tensors_exits_1_instead_of_printing_nan(offline, cli_adapter, capsys):
    change_tensor(cli_adapter / WEIGHTS_FILE, "out_head.lora_B", put(np.nan, (0, 1)))
    assert classify(cli_adapter) == 1
    line = error_line(capsys)
    assert f"{cli_adapter / WEIGHTS_FILE} ({FORMAT}): out_head.lora_B holds NaN" in line
    assert capsys.readouterr().out == ""  # once: "ham\tnan\tWIN a FREE prize now"


def test_inf_and_integer_adapter_tensors_are_refused(adapter, tiny_cfg):
    change_tensor(adapter / WEIGHTS_FILE, "out_head.weight", put(np.inf, (2, 0)))
    with pytest.raises(AdapterError) as e:
        read_adapter(adapter)
    assert f"{adapter / WEIGHTS_FILE} ({FORMAT}): out_head.weight holds inf (1 of 16 values" in one_line(e)
    change_tensor(adapter / WEIGHTS_FILE, "out_head.weight", lambda a: np.zeros(a.shape, dtype=np.int32))
    with pytest.raises(AdapterError) as e:
        read_adapter(adapter)
    assert one_line(e) == f"{adapter / WEIGHTS_FILE} ({FORMAT}): out_head.weight: expected floating-point values, " \
                          f"found int32"


def test_a_float64_adapter_beyond_float32_is_refused_by_a_float32_model(adapter, tiny_cfg):
    change_tensor(adapter / WEIGHTS_FILE, "h.1.attn.c_proj.lora_A",
                  lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, 1e300, a.astype(np.float64)))
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float32")
    before = snapshot(model)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter)
    assert one_line(e).startswith(f"{adapter / WEIGHTS_FILE} ({FORMAT}): h.1.attn.c_proj.lora_A holds values "
                                  f"beyond float32's range")
    assert_unchanged(model, before)
    load_adapter(ml.GPTModel(tiny_cfg, seed=0, dtype="float64"), adapter)  # float64 holds it


def test_misshapen_adapter_tensors_are_listed_on_one_line(adapter, tiny_cfg):
    change_tensor(adapter / WEIGHTS_FILE, "h.0.mlp.c_fc.lora_A", lambda a: np.zeros((8, 5), dtype=np.float32))
    with pytest.raises(AdapterError) as e:
        load_adapter(ml.GPTModel(tiny_cfg, seed=0), adapter)
    assert "h.0.mlp.c_fc.lora_A: shape (8, 5) in the adapter, (8, 2) in the model" in one_line(e)


# ----------------------------------------------------------------------------- where an adapter is written


def test_saving_onto_a_file_is_refused_and_the_file_kept(tmp_path, tiny_cfg):
    target = tmp_path / "adapter"
    target.write_text("my notes")
    with pytest.raises(AdapterError) as e:
        classifier_adapter(target, tiny_cfg)
    assert one_line(e).startswith(f"{target} is a file, not a folder")
    assert target.read_text() == "my notes" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_the_config_is_written_under_minilora_s_own_name(adapter):
    """adapter_config.json is PEFT's name for PEFT's schema: a PEFT tool that met ours failed obscurely."""
    assert sorted(p.name for p in adapter.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    assert CONFIG_FILE != OLD_CONFIG_FILE == "adapter_config.json"


def test_saving_over_an_older_adapter_replaces_its_config(adapter, tiny_cfg):
    (adapter / CONFIG_FILE).rename(adapter / OLD_CONFIG_FILE)  # as an older minilora left it
    classifier_adapter(adapter, tiny_cfg, class_names=["a", "b"])
    assert sorted(p.name for p in adapter.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    assert read_adapter(adapter)[0]["class_names"] == ["a", "b"]


PEFT_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn"],
               "base_model_name_or_path": "gpt2", "task_type": "CAUSAL_LM"}


@pytest.mark.parametrize("files", [("config",), ("weights",), ("config", "weights")])
def test_a_peft_adapter_is_named_as_one(tmp_path, tiny_cfg, files):
    folder = tmp_path / "peft"
    folder.mkdir()
    if "config" in files:
        (folder / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    if "weights" in files:
        save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((8, 8), np.float32)},
                  str(folder / "adapter_model.safetensors"))
    model = ml.GPTModel(tiny_cfg, seed=0)
    before = snapshot(model)
    with pytest.raises(AdapterError) as e:  # read as PEFT (minilora.peft), and refused as a PEFT folder
        load_adapter(model, folder)
    message = one_line(e)
    if files == ("config", "weights"):  # both files, but only block 0's lora_A of what c_attn needs
        assert message.startswith(f"{folder / 'adapter_model.safetensors'}: missing tensor "
                                  f"base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"), message
    else:
        missing = "adapter_model.safetensors" if files == ("config",) else "adapter_config.json"
        assert message == f"not a PEFT adapter folder: {folder / missing} is missing"
    assert_unchanged(model, before)


def test_classify_on_a_peft_adapter_says_so(offline, tmp_path, capsys):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    assert classify(folder) == 1
    assert f"not a PEFT adapter folder: {folder / 'adapter_model.safetensors'} is missing" in error_line(capsys)


def test_another_format_under_the_old_name_is_named(adapter):
    write_changed(adapter / CONFIG_FILE, {"format": "other-lora/3"})
    (adapter / CONFIG_FILE).rename(adapter / OLD_CONFIG_FILE)
    with pytest.raises(AdapterError) as e:
        read_adapter(adapter)
    message = one_line(e)
    assert names_file_and_key(message, adapter / OLD_CONFIG_FILE, "format") and "other-lora/3" in message


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True])
def test_a_head_of_fewer_than_two_classes_is_refused(tiny_cfg, num_classes):
    """A 1-class head used to be built, saved, and then refused by load_adapter (num_classes >= 2)."""
    model = ml.GPTModel(tiny_cfg, seed=0)
    with pytest.raises(ValueError, match=r"^num_classes must be an integer >= 2, got "):
        model.replace_head(num_classes)
    assert "out_head.weight" not in model.params
