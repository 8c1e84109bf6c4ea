"""`minilora bench --compare` (LoRA against full fine-tuning): the sizes it reports are
the ones the parameter counts predict, full fine-tuning is exact, and the command runs
end to end on a tiny shape. No timed assertions: the times are the benchmark's job."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import minilora as ml
from minilora.backend import to_numpy
from minilora.bench import build_step, step_matmuls
from minilora.bench_compare import SETUPS, bench_config, rank_formula, save_finetune
from minilora.gradcheck import MODEL_TOL, check_model

ROW_FIELDS = {"setup", "about", "rank", "targets", "trainable_params", "total_params", "param_bytes",
              "gradient_bytes", "optimizer_state_bytes", "lora_values_formula", "dense_values_same_weights",
              "matmul_gflop", "step_seconds", "step_seconds_rounds", "optimizer_seconds", "floor_seconds",
              "step_over_floor", "full_step_over_this_step", "step_peak_bytes", "training_bytes", "saved_files",
              "saved_bytes", "saved_values", "saved_metadata_bytes", "peak_rss_bytes"}


def safetensors_header_bytes(path):
    """8 bytes holding the header's length, then the JSON header itself."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@pytest.mark.parametrize("setup", SETUPS[1:], ids=lambda s: s.name)
def test_adapter_size_on_disk_is_what_the_parameter_count_predicts(tmp_path, setup):
    """adapter.safetensors = 4 bytes per saved value + its header; the values are the
    trainable ones ((m + n) r per adapter) and the random frozen head saved with them."""
    model, _ = build_step(bench_config("tiny"), 2, 8, setup.rank, targets=setup.targets)
    files = save_finetune(model, tmp_path / "adapter")
    trainable = model.num_params(trainable_only=True)
    assert rank_formula(model)[0] == trainable  # sum over the adapters of (in + out) * r
    head = model.params["out_head.weight"].size + model.params["out_head.bias"].size
    weights = tmp_path / "adapter" / "adapter.safetensors"
    header = safetensors_header_bytes(weights)
    assert files["adapter.safetensors"] == 4 * (trainable + head) + header
    config_text = (tmp_path / "adapter" / ml.adapters.CONFIG_FILE).read_text()
    assert files[ml.adapters.CONFIG_FILE] == len(config_text.encode())
    n_tensors = len(model.lora.param_names) + 2
    assert header < 160 * n_tensors  # the metadata: a name, a dtype, a shape, two offsets per tensor


def test_full_checkpoint_holds_every_value_once(tmp_path):
    model, _ = build_step(bench_config("tiny"), 2, 8, targets=None)
    files = save_finetune(model, tmp_path / "full")
    headers = sum(safetensors_header_bytes(tmp_path / "full" / f) for f in files if f.endswith(".safetensors"))
    config = files["config.json"]
    assert sum(files.values()) == 4 * model.num_params() + headers + config


def test_full_finetuning_trains_everything_and_its_floor_has_every_dw():
    cfg = bench_config("tiny")
    full, _ = build_step(cfg, 2, 8, targets=None)
    assert sorted(full.trainable) == sorted(full.params) and full.lora is None
    n_linear_weights = sum(n.endswith(".weight") and p.ndim == 2 and not n.startswith(("wte", "wpe"))
                           for n, p in full.params.items())

    def dw_products(model):  # x^T @ dout with the shape of a base weight
        shapes = {p.shape for n, p in model.params.items() if n.endswith(".weight") and "lora" not in n}
        return [pr for pr in step_matmuls(model, 2, 8) if pr[2] and (pr[0][0], pr[1][1]) in shapes]

    assert len(dw_products(full)) == n_linear_weights
    for setup in SETUPS[1:]:  # frozen means no work: no dW for any base weight
        model, _ = build_step(cfg, 2, 8, setup.rank, targets=setup.targets)
        assert dw_products(model) == [], setup.name


def test_full_finetuning_classifier_gradients_match_finite_differences(tiny_cfg, tiny_idx):
    """The `full` setup on the tiny gradient-check model: every parameter, the new head
    and both embeddings included (gradcheck's `gpt2` check is the same without the head)."""
    model = ml.GPTModel(tiny_cfg, seed=2, dtype="float64").replace_head(2)
    assert sorted(model.trainable) == sorted(model.params)
    r = check_model(model, tiny_idx, "gpt2_full_classifier")
    assert set(r.errors) == set(model.params)
    assert r.max_rel_error < MODEL_TOL, {k: v for k, v in r.errors.items() if v > MODEL_TOL}


def test_bench_compare_runs_end_to_end_on_a_tiny_shape(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, "-m", "minilora", "bench", "--compare", "--model", "tiny",
                           "--batch-size", "2", "--seq", "8", "--repeats", "2", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert {"device", "model", "config", "batch", "seq", "machine", "loadavg_before", "loadavg_after",
            "setups", "savings", "paper"} <= set(report)
    rows = {r["setup"]: r for r in report["setups"]}
    assert list(rows) == [s.name for s in SETUPS]
    for name, row in rows.items():
        missing = ROW_FIELDS - set(row) - ({"full_step_over_this_step"} if name == "full" else set())
        assert not missing, (name, missing)
        # float32: one gradient and two AdamW moments per trainable value
        assert row["gradient_bytes"] == 4 * row["trainable_params"]
        assert row["optimizer_state_bytes"] == 8 * row["trainable_params"]
        # the measured peak of a step holds at least the gradients the step made
        assert row["step_peak_bytes"] >= row["gradient_bytes"]
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    for name in ("lora_all_r16", "lora_qv_r4", "lora_attn_r8"):
        assert rows[name]["trainable_params"] == rows[name]["lora_values_formula"]
        s = report["savings"][name]
        assert {"memory_saving", "rss_saving", "checkpoint_factor", "speedup", "optimizer_state_factor"} <= set(s)
        assert s["checkpoint_factor"] > 1 and s["optimizer_state_factor"] > 1
    assert round(report["paper"]["gpt3_qv_r4_checkpoint_factor"]) == 9272


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_gradient_and_optimizer_bytes_are_the_arrays_a_step_makes(setup):
    """What the report counts as gradient and optimizer-state bytes (TrainStep.grad_bytes,
    the AdamW moments) against the arrays themselves: one float32 gradient and two float32
    moments (m, v) per trainable value, nothing for a frozen one."""
    model, step = build_step(bench_config("tiny"), 2, 8, setup.rank or 0, targets=setup.targets)
    seen = []
    backward = model.backward

    def keep_grads(*args, **kwargs):
        grads = backward(*args, **kwargs)
        seen.append(grads)
        return grads

    model.backward = keep_grads
    step()
    step()
    trainable = {n: model.params[n] for n in model.trainable}
    n_trainable = sum(int(p.size) for p in trainable.values())
    assert n_trainable == model.num_params(trainable_only=True)
    if setup.targets is not None:
        assert n_trainable < model.num_params() / 2  # LoRA: most of the model is frozen
    grads = seen[-1]
    assert set(grads) == set(trainable)
    for moments in (grads, step.opt.m, step.opt.v):
        assert set(moments) == set(trainable)
        for n, a in moments.items():
            assert a.shape == trainable[n].shape and a.dtype == np.float32, n
    assert step.grad_bytes == sum(int(g.nbytes) for g in grads.values()) == 4 * n_trainable
    state = [a for d in (step.opt.m, step.opt.v) for a in d.values()]
    assert sum(int(a.nbytes) for a in state) == 2 * 4 * n_trainable


def test_bench_compare_table(capsys):
    from minilora import cli

    assert cli.main(["bench", "--compare", "--model", "tiny", "--batch-size", "2", "--seq", "8", "--repeats", "1",
                     "--no-rss", "--no-floor"]) == 0
    text = capsys.readouterr().out
    for word in ("full", "lora_qv_r4", "checkpoint factor", "~10,000x", "memory:", "checkpoint:", "speed:"):
        assert word in text, word


def test_lora_setups_share_the_frozen_weights_and_full_refuses_to():
    cfg = bench_config("tiny")
    base, _ = build_step(cfg, 2, 4, 4, targets="attention")
    other, step = build_step(cfg, 2, 4, 8, targets=["c_attn.q", "attn.c_proj"], base=base)
    assert other.params["h.0.attn.c_attn.weight"] is base.params["h.0.attn.c_attn.weight"]
    before = to_numpy(base.params["h.0.attn.c_attn.weight"]).copy()
    step()
    np.testing.assert_array_equal(to_numpy(base.params["h.0.attn.c_attn.weight"]), before)
    with pytest.raises(ValueError, match="full fine-tuning"):
        build_step(cfg, 2, 4, targets=None, base=base)


@pytest.fixture
def no_benchmark(monkeypatch):
    """Any benchmark run fails the test: the options must be refused before one starts."""
    import minilora.bench
    import minilora.bench_compare

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(minilora.bench_compare, "run_compare", refuse)
    monkeypatch.setattr(minilora.bench, "run_benchmark", refuse)


@pytest.mark.parametrize("argv, says", [
    (["--compare", "--rank", "4"], "--rank cannot be used with --compare"),
    (["--compare", "--memory"], "--memory cannot be used with --compare (it sets its own ranks and runs no "
                                "PyTorch comparison, memory sweep or generation timing)"),
    (["--compare", "--no-torch", "--no-generation"], "--no-torch, --no-generation cannot be used with --compare"),
    (["--no-rss", "--out", "r.json"], "--no-rss, --out only apply to --compare"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["--compare", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--seq", "-1"], "argument --seq: must be an integer >= 1, got -1"),
    (["--rank", "0"], "argument --rank: must be an integer >= 1, got 0"),
    (["--compare", "--out", "{tmp}/missing/r.json"], "argument --out: the folder {tmp}/missing does not exist"),
    (["--compare", "--out", "{tmp}"], "argument --out: {tmp} is a folder; give a file name"),
])
def test_bench_options_are_checked_before_the_benchmark(no_benchmark, tmp_path, capsys, argv, says):
    from minilora import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--model", "tiny", *(a.format(tmp=tmp_path) for a in argv)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("minilora bench: error: " + says.format(tmp=tmp_path)), err


def test_bench_out_in_a_read_only_folder_is_refused_before_the_benchmark(no_benchmark, tmp_path, capsys):
    import os

    from minilora import cli

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(SystemExit):
            cli.main(["bench", "--compare", "--model", "tiny", "--out", str(folder / "r.json")])
        assert f"argument --out: the folder {folder} is not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)


def test_bench_compare_out_is_written_whole(tmp_path, monkeypatch, capsys):
    import minilora.bench_compare
    from minilora import cli

    monkeypatch.setattr(minilora.bench_compare, "run_compare", lambda *a, **k: {"setups": [], "x": 1})
    out = tmp_path / "compare.json"
    assert cli.main(["bench", "--compare", "--model", "tiny", "--json", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"setups": [], "x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["compare.json"]  # no temporary left beside it
