"""Every file of a training checkpoint is checked before it is trusted (issue 22): the
manifest (sizes and hashes), state.json (minilora.schema), the optimizer's moments and
trained weights against the parameters the model will train; a refused checkpoint is one
line and changes nothing. The checkpoint's adapter describes itself like the final one;
writes killed with SIGKILL leave nothing behind that outlives the next run, and every
resume after one continues to the uninterrupted result bit for bit."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import cli
from minilora import train as train_mod
from minilora.adapters import read_adapter
from minilora.checkpoint import (LOOP_SCHEMA, MANIFEST_FILE, OPTIMIZER_FILE, STATE_FILE, TRAINED_FILE, LoopState,
                                 NotFiniteError, has_checkpoint, load_checkpoint, read_loop_state, save_checkpoint)
from minilora.errors import CheckpointStateError
from minilora.files import atomic_path, clean_stale_temporaries
from minilora.tasks import ClassificationTask
from minilora.train import TrainConfig, TrainingDiverged, train
from fixtures_weights import TINY_REAL_VOCAB

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"food": "pizza pasta bread cheese soup", "sport": "goal match team score ball"}


# ----------------------------------------------------------------------------- a small checkpoint


def lora_model(cfg):
    model = ml.GPTModel(cfg, seed=0).replace_head(2, seed=123)
    ml.apply_lora(model, rank=2, alpha=2, seed=1)
    return model


def saved_checkpoint(cfg, folder, steps=2):
    """A LoRA checkpoint of the tiny model after `steps` AdamW steps on random gradients
    (so that every moment is there and non-zero); returns the model and optimizer saved."""
    model = lora_model(cfg)
    opt = ml.AdamW(model, lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        opt.step({n: rng.standard_normal(model.params[n].shape).astype(model.dtype) for n in model.trainable})
    save_checkpoint(folder, model, opt, LoopState(step=steps, epoch=1))
    return model, opt


def blank(cfg):
    """What a resume loads into: the base model with its head, no LoRA, a new optimizer."""
    model = ml.GPTModel(cfg, seed=0).replace_head(2, seed=123)
    return model, ml.AdamW(model, lr=1e-2)


def snapshot(model, opt):
    """Everything load_checkpoint may change, as copies."""
    return ({n: np.array(a) for n, a in model.params.items()}, list(model.trainable), model.lora,
            opt.step_count, dict(opt.m), model._dropout_rng.bit_generator.state)


def assert_unchanged(model, opt, before):
    params, trainable, lora, step, m, rng = before
    assert model.lora is lora and model.trainable == trainable and set(model.params) == set(params)
    for name, array in params.items():
        np.testing.assert_array_equal(model.params[name], array, err_msg=name)
    assert (opt.step_count, opt.m, model._dropout_rng.bit_generator.state) == (step, m, rng)


def refused(folder, model, opt):
    """The one line load_checkpoint refuses `folder` with, checking that nothing changed."""
    before = snapshot(model, opt)
    with pytest.raises(CheckpointStateError) as e:
        load_checkpoint(folder, model, opt)
    assert_unchanged(model, opt, before)
    assert "\n" not in str(e.value)
    return str(e.value)


def resign(folder):
    """Rewrite manifest.json for the files as they are now, as minilora writes it (each
    file's path, size and sha256): a checkpoint whose damage the manifest cannot see, so
    that the checks behind it are the ones that must speak."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": "minilora-checkpoint/1", "files": entries}))


def edit_state(folder, change):
    path = folder / STATE_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    resign(folder)
    return path


def test_the_loop_schema_holds_every_field_of_the_loop_state():
    assert set(LOOP_SCHEMA.fields) == {f.name for f in fields(LoopState)}


def test_a_whole_checkpoint_loads_to_what_was_saved(tiny_cfg, tmp_path):
    model, opt = saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    fresh, fresh_opt = blank(tiny_cfg)
    state = load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    assert (state.step, state.epoch, fresh_opt.step_count) == (2, 1, 2)
    for name in model.trainable:
        np.testing.assert_array_equal(fresh.params[name], model.params[name], err_msg=name)
        np.testing.assert_array_equal(fresh_opt.m[name], opt.m[name], err_msg=name)
        np.testing.assert_array_equal(fresh_opt.v[name], opt.v[name], err_msg=name)
    listed = {e["path"] for e in json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())["files"]}
    written = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert listed == written - {MANIFEST_FILE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary, no .old


# ----------------------------------------------------------------------------- the manifest


def test_a_truncated_optimizer_file_is_named_with_both_sizes(tiny_cfg, tmp_path):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / OPTIMIZER_FILE
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:1000])
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line == f"{path}: 1,000 bytes, the manifest says {size:,}: the checkpoint is damaged"
    with pytest.raises(CheckpointStateError, match="1,000 bytes, the manifest says"):
        has_checkpoint(tmp_path / "ckpt")  # a damaged checkpoint does not pass for none


def test_a_file_altered_in_place_is_named(tiny_cfg, tmp_path):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "adapter" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the same size: only the hash tells
    path.write_bytes(bytes(data))
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line.startswith(f"{path}: sha256 ") and line.endswith(
        "it changed after it was written: the checkpoint is damaged")


def test_a_deleted_file_is_named(tiny_cfg, tmp_path):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    (tmp_path / "ckpt" / STATE_FILE).unlink()
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line == f"{tmp_path / 'ckpt' / STATE_FILE}: missing, the manifest lists it: the checkpoint is damaged"
    with pytest.raises(CheckpointStateError, match="missing, the manifest lists it"):
        read_loop_state(tmp_path / "ckpt")


@pytest.mark.parametrize("name", [
    TRAINED_FILE,  # would make the loader take the full-fine-tuning path
    "adapter/adapter_config.json",  # an older minilora's config name, which read_adapter reads too
])
def test_a_file_the_manifest_does_not_list_that_loading_reads_is_named(tiny_cfg, tmp_path, name):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    (tmp_path / "ckpt" / name).write_bytes(b"")
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line == (f"{tmp_path / 'ckpt' / name}: not in the manifest (minilora did not write it there): "
                    f"the checkpoint is damaged")


def test_files_that_loading_never_reads_do_not_stop_a_resume(tiny_cfg, tmp_path):
    """Finder leaves a .DS_Store in every folder it shows, Explorer a Thumbs.db: such a
    checkpoint was refused ("not in the manifest"), and the run could not be resumed."""
    model, saved_opt = saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    for name in (".DS_Store", "adapter/.DS_Store", "Thumbs.db"):
        (tmp_path / "ckpt" / name).write_bytes(b"\0\0\0\1Bud1")
    fresh, opt = blank(tiny_cfg)
    assert load_checkpoint(tmp_path / "ckpt", fresh, opt).step == 2
    for name in model.trainable:
        np.testing.assert_array_equal(fresh.params[name], model.params[name], err_msg=name)
        np.testing.assert_array_equal(opt.m[name], saved_opt.m[name], err_msg=name)


@pytest.mark.parametrize("text, says", [
    ("{", "manifest.json is not valid JSON"),
    ('{"format": "minilora-checkpoint/9", "files": []}', 'format: expected one of "minilora-checkpoint/1"'),
    ('{"format": "minilora-checkpoint/1", "files": [{"path": "../state.json", "size": 1, "sha256": "' + "0" * 64
     + '"}]}', 'files[0].path: expected the path of a file inside the checkpoint folder, found "../state.json"'),
    ('{"format": "minilora-checkpoint/1", "files": [{"path": "state.json", "size": 1, "sha256": "abc"}]}',
     'files[0].sha256: expected 64 hexadecimal digits, found "abc"'),
])
def test_a_damaged_manifest_is_named(tiny_cfg, tmp_path, text, says):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    (tmp_path / "ckpt" / MANIFEST_FILE).write_text(text)
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line.startswith(str(tmp_path / "ckpt" / MANIFEST_FILE)) and says in line


def test_a_checkpoint_written_before_manifests_and_newer_fields_still_loads(tiny_cfg, tmp_path):
    """No manifest.json, and a loop state without tokens_seen and task, as minilora wrote
    checkpoints before them: it loads, each file checked as it is read."""
    model, _ = saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    (tmp_path / "ckpt" / MANIFEST_FILE).unlink()
    state_file = tmp_path / "ckpt" / STATE_FILE
    meta = json.loads(state_file.read_text())
    del meta["loop"]["tokens_seen"], meta["loop"]["task"]
    state_file.write_text(json.dumps(meta))
    assert has_checkpoint(tmp_path / "ckpt")
    fresh, opt = blank(tiny_cfg)
    state = load_checkpoint(tmp_path / "ckpt", fresh, opt)
    assert (state.tokens_seen, state.task, state.step) == (None, "classification", 2)
    for name in model.trainable:
        np.testing.assert_array_equal(fresh.params[name], model.params[name], err_msg=name)
    # without a manifest a truncated file is still one line, from the tensor reader
    path = tmp_path / "ckpt" / OPTIMIZER_FILE
    path.write_bytes(path.read_bytes()[:1000])
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line.startswith(f"{path} is not a readable safetensors file (")
    assert line.endswith("the checkpoint is damaged")


# ----------------------------------------------------------------------------- state.json


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


@pytest.mark.parametrize("change, says", [
    (_set("loop", "future_field", 1), "loop.future_field: not a key of a loop state"),
    (_set("loop", "step", "3"), 'loop.step: expected an integer >= 0, found "3"'),
    (_set("loop", "epoch", -1), "loop.epoch: expected an integer >= 0, found -1"),
    (_set("loop", "history", {"0": {}}), 'loop.history: expected a list of an object, found {"0": {}}'),
    (_set("loop", "history", [{"step": 0}]), "loop.history[0].epoch: missing (expected an integer >= 1)"),
    (_set("loop", "done", "no"), 'loop.done: expected true or false, found "no"'),
    (_set("optimizer", "betas", [0.9]), "optimizer.betas: expected two numbers in [0, 1), found [0.9]"),
    (_set("optimizer", "betas", [0.9, 1.0]), "optimizer.betas: expected two numbers in [0, 1), found [0.9, 1.0]"),
    (_set("optimizer", "betas", ["a", 0.999]), 'optimizer.betas[0]: expected a finite number >= 0, found "a"'),
    (_set("optimizer", "eps", -1e-8), "optimizer.eps: expected a finite number >= 0, found -1e-08"),
    (_set("dropout_rng", "x"), 'dropout_rng: expected an object, found "x"'),
    (_set("dropout_rng", {"seed": 1}), "dropout_rng.seed: not a key of a dropout generator state"),
    (_set("dropout_rng", "bit_generator", "MT19937"), 'dropout_rng.bit_generator: expected one of "PCG64"'),
    (_set("dropout_rng", "state", "inc", -1), "dropout_rng.state.inc: expected an integer >= 0"),
    (lambda meta: meta.pop("optimizer"), "optimizer: missing (expected an object)"),
])
def test_a_state_file_of_the_wrong_shape_is_one_line_naming_the_key(tiny_cfg, tmp_path, change, says):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    path = edit_state(tmp_path / "ckpt", change)
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line.startswith(f"{path}: {says}"), line
    with pytest.raises(CheckpointStateError, match="^" + str(path)):
        read_loop_state(tmp_path / "ckpt")


def test_a_nan_in_the_state_file_is_refused_naming_its_key(tiny_cfg, tmp_path):
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / STATE_FILE
    path.write_text(path.read_text().replace('"seconds": 0.0', '"seconds": NaN', 1))  # what Python's json writes
    resign(tmp_path / "ckpt")
    line = refused(tmp_path / "ckpt", *blank(tiny_cfg))
    assert line == f"{path}: loop.seconds: expected a finite number >= 0, found nan"


def test_a_nan_evaluation_is_saved_as_null_and_loads(tiny_cfg, tmp_path):
    """An evaluation over no batch is NaN; state.json holds it as null (JSON has no NaN)."""
    model = lora_model(tiny_cfg)
    row = {"step": 0, "epoch": 1, "examples_seen": 2, "tokens_seen": 10, "train_loss": 0.7, "val_loss": float("nan")}
    save_checkpoint(tmp_path / "ckpt", model, ml.AdamW(model), LoopState(evals=[row]))
    assert json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())["loop"]["evals"][0]["val_loss"] is None
    assert read_loop_state(tmp_path / "ckpt").evals == [{**row, "val_loss": None}]


# ----------------------------------------------------------------------------- the moments and the weights


def edit_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    resign(path.parent)


def _without(key):
    return lambda t: t.pop(key)


def _replace(key, make):
    def change(t):
        t[key] = make(t[key])
    return change


def _nan_at_first(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


@pytest.mark.parametrize("change, says", [
    (_without("v/h.0.attn.c_proj.lora_B"), "v/h.0.attn.c_proj.lora_B missing: the checkpoint is damaged"),
    (_without("m/out_head.lora_A"), "m/out_head.lora_A missing: the checkpoint is damaged"),
    (lambda t: t.update({"m/h.0.ln_1.weight": np.zeros(8, np.float32)}),
     "m/h.0.ln_1.weight is not a moment of a parameter this model trains: the checkpoint is not this model's"),
    (_replace("m/h.1.mlp.c_fc.lora_A", lambda a: a.T.copy()),
     "m/h.1.mlp.c_fc.lora_A has shape (2, 8), the parameter's is (8, 2): the checkpoint is not this model's"),
    (_replace("v/h.1.mlp.c_fc.lora_B", lambda a: a.astype(np.int32)),
     "v/h.1.mlp.c_fc.lora_B is int32, expected floating point: the checkpoint is damaged"),
    (_replace("v/h.0.attn.c_attn.q.lora_A", _nan_at_first),
     "v/h.0.attn.c_attn.q.lora_A holds NaN or inf: the checkpoint is damaged"),
])
def test_moments_that_do_not_fit_the_adapter_are_refused_before_it_is_attached(tiny_cfg, tmp_path, change, says):
    """A deleted moment used to be accepted (AdamW then started it from zero, and the
    resumed run silently left the uninterrupted one); each problem is named, and the
    model stays without an adapter."""
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / OPTIMIZER_FILE
    edit_tensors(path, change)
    assert refused(tmp_path / "ckpt", *blank(tiny_cfg)) == f"{path}: {says}"


def test_full_fine_tuning_weights_and_moments_are_checked(tiny_cfg, tmp_path):
    trained = ml.GPTModel(tiny_cfg, seed=1)
    opt = ml.AdamW(trained, lr=1e-3)
    opt.step({n: np.ones_like(trained.params[n]) for n in trained.trainable})
    save_checkpoint(tmp_path / "ckpt", trained, opt, LoopState(task="instruction", step=1))
    path = tmp_path / "ckpt" / TRAINED_FILE
    edit_tensors(path, _replace("h.1.mlp.c_proj.weight", _nan_at_first))
    fresh = ml.GPTModel(tiny_cfg, seed=2)
    assert refused(tmp_path / "ckpt", fresh, ml.AdamW(fresh)) == \
        f"{path}: h.1.mlp.c_proj.weight holds NaN or inf: the checkpoint is damaged"

    save_checkpoint(tmp_path / "ckpt", trained, opt, LoopState(task="instruction", step=1))
    edit_tensors(tmp_path / "ckpt" / OPTIMIZER_FILE, _without("m/wte.weight"))
    fresh = ml.GPTModel(tiny_cfg, seed=2)
    assert refused(tmp_path / "ckpt", fresh, ml.AdamW(fresh)) == \
        f"{tmp_path / 'ckpt' / OPTIMIZER_FILE}: m/wte.weight missing: the checkpoint is damaged"


def test_a_non_finite_state_is_never_saved_over_a_good_checkpoint(tiny_cfg, tmp_path):
    model, opt = saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    before = {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    opt.v["h.0.mlp.c_fc.lora_B"][0, 0] = np.inf
    with pytest.raises(NotFiniteError, match=r"^the optimizer's moment v/h.0.mlp.c_fc.lora_B holds NaN or inf$"):
        save_checkpoint(tmp_path / "ckpt", model, opt, LoopState(step=3))
    opt.v["h.0.mlp.c_fc.lora_B"][0, 0] = 0.0
    model.params["out_head.lora_B"][0, 0] = np.nan
    with pytest.raises(NotFiniteError, match=r"^the parameter out_head.lora_B holds NaN or inf$"):
        save_checkpoint(tmp_path / "ckpt", model, opt, LoopState(step=3))
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ----------------------------------------------------------------------------- divergence names only a good checkpoint


class RandomBatches:
    """`n` fixed classification batches of 2 random 5-token texts (V=11): what train()
    reads of a loader (len, epoch_batches)."""

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.batches = [(rng.integers(0, 11, (2, 5)), rng.integers(0, 2, 2), np.full(2, 4)) for _ in range(n)]

    def __len__(self):
        return len(self.batches)

    def epoch_batches(self, epoch, start=0):
        return iter(self.batches[start:])


def run_poisoned(cfg, ckpt, monkeypatch, poison_after_step, between=None):
    """Train 2 epochs of 4 steps; after the optimizer step `poison_after_step` (0-based) a
    parameter becomes NaN, so that step's own loss is still finite. `between(calls)` runs
    before each step. Returns the TrainingDiverged raised."""
    model = lora_model(cfg)
    opt = ml.AdamW(model, lr=1e-2)
    real_step, calls = train_mod.train_step, []

    def step(model_, *args, **kwargs):
        if between:
            between(len(calls))
        loss = real_step(model_, *args, **kwargs)
        if len(calls) == poison_after_step:
            model_.params["h.0.mlp.c_fc.lora_B"][0, 0] = np.nan
        calls.append(1)
        return loss

    monkeypatch.setattr(train_mod, "train_step", step)
    with pytest.raises(TrainingDiverged) as e:
        train(model, opt, ClassificationTask(), RandomBatches(4), RandomBatches(2, seed=1),
              TrainConfig(epochs=2, eval_freq=100, eval_iter=1), checkpoint_dir=ckpt, progress=False)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN parameter on purpose
def test_a_state_that_became_nan_at_the_end_of_an_epoch_is_not_saved(tiny_cfg, tmp_path, monkeypatch):
    """The last step of epoch 1 makes a parameter NaN with a finite loss: the checkpoint
    after it used to be written with NaNs, and then called 'the last good checkpoint'."""
    line = run_poisoned(tiny_cfg, tmp_path / "ckpt", monkeypatch, poison_after_step=3)
    assert line.startswith("the parameter h.0.mlp.c_fc.lora_B holds NaN or inf after 4 steps; the parameters are "
                           "no longer usable. No checkpoint was written before it")
    assert not (tmp_path / "ckpt").exists()
    line = run_poisoned(tiny_cfg, tmp_path / "ckpt2", monkeypatch, poison_after_step=7)  # the end of epoch 2
    assert f"The last good checkpoint is kept in {tmp_path / 'ckpt2'}" in line
    fresh, opt = blank(tiny_cfg)
    assert load_checkpoint(tmp_path / "ckpt2", fresh, opt).step == 4  # epoch 1's, whole and finite


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_damaged_checkpoint_is_not_called_good_when_the_run_diverges(tiny_cfg, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"

    def damage_in_epoch_2(calls):
        if calls == 5:  # after epoch 1's checkpoint: a file of it is cut short
            path = ckpt / OPTIMIZER_FILE
            path.write_bytes(path.read_bytes()[:100])

    line = run_poisoned(tiny_cfg, ckpt, monkeypatch, poison_after_step=5, between=damage_in_epoch_2)
    assert line.startswith("loss became nan at step 6 (epoch 2); the parameters are no longer usable. "
                           f"No good checkpoint is left ({ckpt / OPTIMIZER_FILE}: 100 bytes, the manifest says ")
    assert "last good checkpoint" not in line


# ----------------------------------------------------------------------------- the checkpoint's adapter


def test_checkpoint_adapter_records_the_settings_it_is_given(tiny_cfg, tmp_path):
    model = lora_model(tiny_cfg)
    settings = dict(base_model="/models/tiny", class_names=["ham", "spam"], max_length=5, pool="last_real",
                    pad="longest_in_batch", batching="by_length")
    save_checkpoint(tmp_path / "ckpt", model, ml.AdamW(model), LoopState(), adapter_settings=settings)
    config, _ = read_adapter(tmp_path / "ckpt" / "adapter")
    assert {k: config[k] for k in settings} == settings


def write_csv(path, rows=30):
    """`rows` text,label rows cycling through the two classes of WORDS."""
    lines = ["text,label"]
    rng = np.random.default_rng(0)
    for i in range(rows):
        label = list(WORDS)[i % len(WORDS)]
        lines.append(f"\"{' '.join(rng.permutation(WORDS[label].split()))} number {i}\",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune_args(model, data, out, epochs=3):
    """A tiny `minilora finetune`: 21 training examples in batches of 4, 5 steps an epoch."""
    return ["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--epochs", str(epochs),
            "--rank", "4", "--alpha", "4", "--lr", "2e-3", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1"]


def test_classify_with_the_checkpoint_adapter_of_a_crashed_run(minilora_home, tiny_checkpoint, tmp_path, monkeypatch,
                                                               capsys):
    """All a user has after a crash is checkpoint/adapter: it names the base model and the
    classes, so classify uses them (it fell back to gpt2-small and printed class 1)."""
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    real_step, calls = train_mod.train_step, []

    def interrupted(*args, **kwargs):
        if len(calls) == 7:  # in epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=2)) == 130
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert not (out / "adapter").exists()
    capsys.readouterr()
    assert cli.main(["classify", "--adapter", str(out / "checkpoint" / "adapter"), "pizza cheese"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in WORDS
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=2) + ["--resume"]) == 0
    final, at_checkpoint = (read_adapter(out / d)[0] for d in ("adapter", "checkpoint/adapter"))
    keys = ("base_model", "class_names", "max_length", "pool", "pad", "batching")
    assert {k: at_checkpoint[k] for k in keys} == {k: final[k] for k in keys}
    assert final["class_names"] == ["food", "sport"] and final["base_model"] == str(tiny_checkpoint.resolve())


def test_a_truncated_optimizer_file_then_resume_is_one_line_and_changes_nothing(minilora_home, tiny_checkpoint,
                                                                                tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=1)) == 0
    path = out / "checkpoint" / OPTIMIZER_FILE
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 2])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=2) + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert err == (f"minilora finetune: error: {path}: {size // 2:,} bytes, the manifest says {size:,}: "
                   f"the checkpoint is damaged\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_run_checkpointed_before_history_rows_had_seconds_resumes_twice(minilora_home, tiny_checkpoint, tmp_path,
                                                                         monkeypatch):
    """state.json as minilora wrote it before bc371a2 (git show bc371a2^:minilora/train.py):
    history rows without "seconds", no tokens_seen anywhere, no task, and no manifest.json
    (before accafd5). It was refused ("history[0].seconds: missing"); it resumes, the old
    steps' seconds empty in history.csv (not measured), and the state saved by that resume,
    its old rows' seconds null, resumes again."""
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=1)) == 0
    ckpt = out / "checkpoint"
    meta = json.loads((ckpt / STATE_FILE).read_text())
    loop = meta["loop"]
    del loop["tokens_seen"], loop["task"]
    for row in loop["history"] + loop["evals"] + loop["epochs"]:
        del row["tokens_seen"]
    for row in loop["history"]:
        del row["seconds"]
    (ckpt / STATE_FILE).write_text(json.dumps(meta))
    (ckpt / MANIFEST_FILE).unlink()
    old_steps = len(loop["history"])
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=2) + ["--resume"]) == 0
    rows = (out / "history.csv").read_text().splitlines()
    seconds = [row.split(",")[rows[0].split(",").index("seconds")] for row in rows[1:]]
    assert seconds[:old_steps] == [""] * old_steps and all(seconds[old_steps:])
    assert read_loop_state(ckpt).history[0]["seconds"] is None
    assert cli.main(finetune_args(tiny_checkpoint, data, out, epochs=3) + ["--resume"]) == 0


# ----------------------------------------------------------------------------- temporaries of killed writes


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    stale_folder = tmp_path / ".checkpoint.ab12cd34.part"
    (stale_folder / "adapter").mkdir(parents=True)
    (stale_folder / "adapter" / "adapter.safetensors").write_bytes(b"half")
    stale_file = tmp_path / ".metrics.json.x_9y8z7w.part"
    stale_file.write_text("{")
    others = [tmp_path / "notes.part", tmp_path / ".hidden", tmp_path / ".checkpoint.old", tmp_path / "metrics.json",
              tmp_path / ".a.toolong123.part"]
    for p in others:
        p.write_text("keep")
    with atomic_path(tmp_path / "history.csv") as writing:  # this process's own: in use
        writing.write_text("step")
        assert clean_stale_temporaries(tmp_path, names=["checkpoint"]) == [stale_folder]
        assert stale_file.exists() and writing.exists()
        assert clean_stale_temporaries(tmp_path) == [stale_file]
        assert writing.exists()
    assert sorted(tmp_path.iterdir()) == sorted(others + [tmp_path / "history.csv"])


def test_save_checkpoint_removes_what_a_killed_save_left(tiny_cfg, tmp_path):
    stale = tmp_path / ".ckpt.q1w2e3r4.part"
    stale.mkdir()
    (stale / OPTIMIZER_FILE).write_bytes(b"half")
    other = tmp_path / ".metrics.json.q1w2e3r4.part"  # not the checkpoint's: left to the run folder's owner
    other.write_text("{")
    saved_checkpoint(tiny_cfg, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "ckpt"]


def test_replacing_a_folder_leaves_a_users_folder_old_beside_it(tiny_checkpoint, tmp_path):
    """`minilora export ... --out exp` and save_adapter(..., "sv") used to delete exp.old
    and sv.old, the name atomic_folder set the previous folder aside under, even when
    there was no previous folder."""
    model = ml.GPTModel(TINY_REAL_VOCAB, seed=0)
    ml.apply_lora(model, rank=2, alpha=2, seed=1)
    ml.save_adapter(model, tmp_path / "lmad", base_model=str(tiny_checkpoint))
    for name in ("exp.old", "sv.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("backup")
    for _ in range(2):  # a new folder, then one replaced
        assert cli.main(["export", str(tmp_path / "lmad"), "--out", str(tmp_path / "exp"), "--offline"]) == 0
        ml.save_adapter(model, tmp_path / "sv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp.old", "lmad", "sv", "sv.old"]
    assert all((tmp_path / name / "keep.txt").read_text() == "backup" for name in ("exp.old", "sv.old"))


def test_a_checkpoint_set_aside_by_a_crash_between_the_renames_is_put_back(tiny_cfg, tmp_path, monkeypatch):
    """The first rename done, the second not (a power cut): only the aside holds the checkpoint."""
    from minilora import files

    saved_checkpoint(tiny_cfg, tmp_path / "ckpt", steps=2)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # ckpt -> its aside done; tmp -> ckpt is the crash
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        saved_checkpoint(tiny_cfg, tmp_path / "ckpt", steps=3)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == asides(tmp_path, "ckpt")  # the aside alone
    assert has_checkpoint(tmp_path / "ckpt") and read_loop_state(tmp_path / "ckpt").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_only_an_older_minilora_s_whole_folder_old_is_put_back(tiny_cfg, tmp_path):
    """<name>.old is what minilora versions before the random names left after such a crash:
    put back when it is a whole checkpoint and no folder is there, left alone otherwise."""
    saved_checkpoint(tiny_cfg, tmp_path / "a")
    os.replace(tmp_path / "a", tmp_path / "a.old")  # an older minilora's crash between the renames
    assert has_checkpoint(tmp_path / "a") and not (tmp_path / "a.old").exists()
    saved_checkpoint(tiny_cfg, tmp_path / "b")
    (tmp_path / "b.old").mkdir()  # the user's, beside a whole checkpoint
    (tmp_path / "b.old" / STATE_FILE).write_text("{}")
    (tmp_path / "c.old").mkdir()  # the user's, not a checkpoint, and no c
    (tmp_path / "c.old" / "keep.txt").write_text("backup")
    assert has_checkpoint(tmp_path / "b") and not has_checkpoint(tmp_path / "c")
    assert (tmp_path / "b.old" / STATE_FILE).read_text() == "{}"
    assert (tmp_path / "c.old" / "keep.txt").read_text() == "backup" and not (tmp_path / "c").exists()


def test_a_stale_aside_goes_only_once_its_folder_is_back(tmp_path):
    """A run killed after the second rename leaves the previous copy aside: removed by the
    folder's one writer; an aside whose folder is missing is its only copy, and stays."""
    for name in ("checkpoint", "adapter"):
        (tmp_path / f".{name}.ab12cd34.old").mkdir()
        (tmp_path / f".{name}.ab12cd34.old" / "x").write_text("old")
    (tmp_path / "checkpoint").mkdir()
    assert clean_stale_temporaries(tmp_path) == [tmp_path / ".checkpoint.ab12cd34.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.ab12cd34.old", "checkpoint"]


# A child `minilora finetune` that kills itself with SIGKILL at one moment of its writes,
# argv[1] naming it (KILL_POINTS), or sleeps half a second inside each checkpoint write
# ("slow") for the test to kill it from outside then. SIGKILL cannot be caught: nothing
# of minilora's cleanup runs, as when the kernel's out-of-memory killer or a power cut stops it.
DRIVER = r"""
import os, signal, sys, time
from pathlib import Path
from minilora import checkpoint, cli, train
from minilora.files import ASIDE_NAME

point, count = sys.argv[1].split(":")
count = int(count)
seen = {"n": 0}

def die_on(hit):
    if hit:
        seen["n"] += 1
        if seen["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)

real_step, real_save, real_replace = train.train_step, checkpoint.save_file, os.replace
real_manifest = checkpoint._write_manifest

def step(*args, **kwargs):
    die_on(point == "step")
    return real_step(*args, **kwargs)

def save_file(tensors, path, *args, **kwargs):
    real_save(tensors, path, *args, **kwargs)
    if point == "slow":
        time.sleep(0.5)
    die_on(point == "optimizer" and Path(path).name == "optimizer.safetensors")

def write_manifest(folder):
    real_manifest(folder)
    die_on(point == "manifest")  # the temporary is whole, nothing renamed yet

def replace(src, dst):
    src, dst = Path(src), Path(dst)
    real_replace(src, dst)
    aside = ASIDE_NAME.fullmatch(dst.name)
    die_on(point == "between_renames" and aside is not None and aside["name"] == "checkpoint")
    # the new checkpoint in place, the old one not yet deleted
    die_on(point == "after_renames" and src.name.startswith(".checkpoint.") and dst.name == "checkpoint")

train.train_step, checkpoint.save_file, os.replace = step, save_file, replace
checkpoint._write_manifest = write_manifest
sys.exit(cli.main(sys.argv[2:]))
"""


def leftovers(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.endswith((".part", ".old")))


def asides(folder, name="checkpoint"):
    """The copies of folder/name that atomic_folder set aside (.<name>.<random>.old)."""
    return sorted(p.name for p in Path(folder).iterdir() if re.fullmatch(rf"\.{name}\.[a-z0-9_]{{8}}\.old", p.name))


def test_runs_killed_at_any_moment_resume_to_the_uninterrupted_result(minilora_home, tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    """One run folder, SIGKILLed six times (in a step before any checkpoint, inside the
    first checkpoint's write, between atomic_folder's two renames, with a whole temporary
    not yet in place, before the old checkpoint is deleted, and from outside while a
    checkpoint is being written), each time resumed with --resume: the run finishes with
    the uninterrupted run's adapter, bit for bit, and nothing of the killed writes is left.
    About 2 s a process (mostly Python's imports) on the 2-core CPU."""
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    data = write_csv(tmp_path / "d.csv")
    assert cli.main(finetune_args(tiny_checkpoint, data, tmp_path / "straight")) == 0  # in this process
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def child(point, resume=True):
        argv = finetune_args(tiny_checkpoint, data, out) + (["--resume"] if resume else [])
        return subprocess.Popen([sys.executable, "-c", DRIVER, point, *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def killed(proc):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err
        return err

    killed(child("step:3", resume=False))  # epoch 1, no checkpoint yet
    assert not (out / "checkpoint").exists()
    killed(child("optimizer:1"))  # inside the first checkpoint's write
    assert leftovers(out) and not (out / "checkpoint").exists()
    killed(child("between_renames:1"))  # the epoch-2 checkpoint: the epoch-1 one set aside
    assert len(asides(out)) == 1 and not (out / "checkpoint").exists()
    killed(child("manifest:1"))  # resumed from epoch 1 (the aside put back); epoch 2's temporary whole
    assert read_loop_state(out / "checkpoint").epoch == 1 and leftovers(out)
    killed(child("after_renames:1"))  # epoch 2's checkpoint in place, epoch 1's still set aside
    assert leftovers(out) == asides(out) and len(asides(out)) == 1 and read_loop_state(out / "checkpoint").epoch == 2

    proc = child("slow:0")  # killed from outside while a checkpoint of epoch 3 is being written
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".checkpoint.") for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended without writing a checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    killed(proc)
    assert any(name.startswith(".checkpoint.") for name in leftovers(out))

    last = child("none:0")
    _, err = last.communicate(timeout=120)
    assert last.returncode == 0, err
    assert leftovers(out) == [] and not (out / ".lock").exists()
    straight, resumed = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (tmp_path / "straight", out))
    assert set(straight) == set(resumed)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", out))
    assert (a["steps"], a["test_accuracy"], a["final_train_loss"]) == (b["steps"], b["test_accuracy"],
                                                                       b["final_train_loss"])
