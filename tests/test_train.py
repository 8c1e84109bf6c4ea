"""The training loop on the real SMS data with a tiny GPT-2: the book's schedule of
evaluations, exact resume after an interruption, divergence handling."""

import json

import numpy as np
import pytest

import minilora as ml
from minilora import train as train_mod
from minilora.data import make_loaders
from minilora.train import TrainConfig, TrainingDiverged, evaluate, load_checkpoint, train_classifier


@pytest.fixture(scope="module")
def tiny_sms_cfg():
    return ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=2)


def fresh(cfg, seed=0):
    model = ml.GPTModel(cfg, seed=seed).replace_head(2, seed=123)
    ml.apply_lora(model, rank=4, alpha=4, seed=123)
    return model, ml.AdamW(model, lr=5e-3, weight_decay=0.1)


def small_loaders(sms_data, n_train=160, batching="shuffled"):
    """The real splits, the training split cut to n_train examples to keep tests quick."""
    from dataclasses import replace

    train = replace(sms_data.train, texts=sms_data.train.texts[:n_train], labels=sms_data.train.labels[:n_train],
                    token_ids=sms_data.train.token_ids[:n_train])
    return make_loaders(replace(sms_data, train=train), 8, seed=123, pad_to="longest_in_batch", batching=batching)


def test_book_schedule_of_evaluations(sms_data, tiny_sms_cfg):
    model, opt = fresh(tiny_sms_cfg)
    train, val, _ = small_loaders(sms_data)
    lines = []
    state = train_classifier(model, opt, train, val, TrainConfig(epochs=2, eval_freq=7, eval_iter=2),
                             log=lines.append, progress=False)
    assert state.done and state.step == 2 * 20 and state.examples_seen == 2 * 160
    assert [e["step"] for e in state.evals] == list(range(0, 40, 7))  # from step 0, as the book
    assert [h["step"] for h in state.history] == list(range(40))
    assert len(state.epochs) == 2 and all(0 <= e["val_accuracy"] <= 1 for e in state.epochs)
    assert lines[0].startswith("Ep 1 (Step 000000): Train loss") and "Validation accuracy" in lines[3]
    assert all(h["lr"] == 5e-3 for h in state.history)


def test_training_lowers_the_loss_and_leaves_the_base_untouched(sms_data, tiny_sms_cfg):
    model, opt = fresh(tiny_sms_cfg)
    base = {n: p.copy() for n, p in model.params.items() if "lora" not in n}
    train, val, _ = small_loaders(sms_data)
    before = evaluate(model, train.epoch_batches(0))[0]
    train_classifier(model, opt, train, val, TrainConfig(epochs=3, eval_freq=100, eval_iter=1), progress=False)
    after = evaluate(model, train.epoch_batches(0))[0]
    assert after < before
    assert all(np.array_equal(model.params[n], p) for n, p in base.items())


def assert_resumes_to(straight, model_s, cfg_model, ckpt, train, val, cfg):
    """Resume a fresh model from the checkpoint `ckpt` and check the finished run is the
    uninterrupted one (`straight`, trained into `model_s`): same losses, evaluations,
    accuracies, and bit for bit the same adapter."""
    model2, opt2 = fresh(cfg_model)
    ml.remove_lora(model2)
    state = load_checkpoint(ckpt, model2, opt2)
    resumed = train_classifier(model2, opt2, train, val, cfg, checkpoint_dir=ckpt, state=state, progress=False)
    assert [h["batch_loss"] for h in resumed.history] == [h["batch_loss"] for h in straight.history]
    assert resumed.evals == straight.evals and resumed.epochs == straight.epochs
    for n in model_s.lora.param_names:
        np.testing.assert_array_equal(model2.params[n], model_s.params[n], err_msg=n)


@pytest.mark.parametrize("batching", ["shuffled", "by_length"])
def test_interrupted_run_resumes_to_the_same_result(sms_data, tiny_sms_cfg, tmp_path, monkeypatch, batching):
    cfg = TrainConfig(epochs=2, eval_freq=9, eval_iter=2)
    train, val, _ = small_loaders(sms_data, batching=batching)
    model_s, opt_s = fresh(tiny_sms_cfg)
    straight = train_classifier(model_s, opt_s, train, val, cfg, progress=False)

    model, opt = fresh(tiny_sms_cfg)
    real_step, calls = train_mod.train_step, []

    def step_then_interrupt(*args, **kwargs):
        if len(calls) == 27:  # in the middle of the second epoch
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(model, opt, train, val, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    saved = json.loads((tmp_path / "ckpt" / "state.json").read_text())["loop"]
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 7, 27)

    assert_resumes_to(straight, model_s, tiny_sms_cfg, tmp_path / "ckpt", train, val, cfg)
    assert not list(tmp_path.glob("ckpt.*"))  # no temporary or old checkpoint folders left


def test_ctrl_c_during_an_evaluation_waits_for_the_step_and_resumes_exactly(sms_data, tiny_sms_cfg, tmp_path,
                                                                             monkeypatch):
    """A real SIGINT in the middle of the evaluation that follows step 9 (the optimizer has
    stepped, the loop's counters not yet): the step completes, then the run stops with a
    checkpoint after it, and the resumed run is bit for bit the uninterrupted one."""
    import os
    import signal

    cfg = TrainConfig(epochs=2, eval_freq=9, eval_iter=2)
    train, val, _ = small_loaders(sms_data)
    model_s, opt_s = fresh(tiny_sms_cfg)
    straight = train_classifier(model_s, opt_s, train, val, cfg, progress=False)

    model, opt = fresh(tiny_sms_cfg)
    real_evaluate, calls = train_mod.evaluate, []

    def evaluate_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first evaluation of step 9
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", evaluate_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(model, opt, train, val, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    saved = json.loads((tmp_path / "ckpt" / "state.json").read_text())["loop"]
    assert saved["step"] == 10 and saved["batch"] == 10  # after step 9 and its evaluation

    assert_resumes_to(straight, model_s, tiny_sms_cfg, tmp_path / "ckpt", train, val, cfg)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(sms_data, tiny_sms_cfg, tmp_path, monkeypatch):
    import os
    import signal

    cfg = TrainConfig(epochs=2, eval_freq=9, eval_iter=2)
    train, val, _ = small_loaders(sms_data)
    model, opt = fresh(tiny_sms_cfg)
    train_classifier(model, opt, train, val, TrainConfig(epochs=1, eval_freq=9, eval_iter=2),
                     checkpoint_dir=tmp_path / "ckpt", progress=False)  # a checkpoint after epoch 1
    before = (tmp_path / "ckpt" / "state.json").read_text()
    real_step, calls = train_mod.train_step, []

    def step_with_two_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_with_two_ctrl_c)
    model, opt = fresh(tiny_sms_cfg)
    ml.remove_lora(model)
    state = load_checkpoint(tmp_path / "ckpt", model, opt)
    with pytest.raises(train_mod.StoppedMidStep):
        train_classifier(model, opt, train, val, cfg, checkpoint_dir=tmp_path / "ckpt", state=state, progress=False)
    assert (tmp_path / "ckpt" / "state.json").read_text() == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(sms_data, tiny_sms_cfg, tmp_path, monkeypatch):
    model, opt = fresh(tiny_sms_cfg)
    train, val, _ = small_loaders(sms_data)
    real_step, calls = train_mod.train_step, []

    def poisoned(model_, *args, **kwargs):
        calls.append(1)
        if len(calls) == 25:  # second epoch: poison a weight
            model_.params["h.0.mlp.c_fc.lora_B"][0, 0] = np.nan
        return real_step(model_, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 24"):
        train_classifier(model, opt, train, val, TrainConfig(epochs=2, eval_freq=50, eval_iter=1),
                         checkpoint_dir=tmp_path / "ckpt", progress=False)
    saved = json.loads((tmp_path / "ckpt" / "state.json").read_text())["loop"]
    assert (saved["epoch"], saved["step"]) == (1, 20)  # the end of the first, good epoch
    model2, opt2 = fresh(tiny_sms_cfg)
    ml.remove_lora(model2)
    load_checkpoint(tmp_path / "ckpt", model2, opt2)
    assert all(np.isfinite(model2.params[n]).all() for n in model2.trainable)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the poisoned weight makes NaNs on purpose
def test_losses_read_back_in_groups_are_the_same(sms_data, tiny_sms_cfg, monkeypatch):
    """The GPU mode (losses kept on the device, read every N steps) records the same history
    and still stops on the first non-finite loss, naming its step."""
    train, val, _ = small_loaders(sms_data)
    runs = []
    for sync_every in (1, 7):
        model, opt = fresh(tiny_sms_cfg)
        runs.append(train_classifier(model, opt, train, val, TrainConfig(epochs=1, eval_iter=1, sync_every=sync_every),
                                     progress=False))
    assert [h["batch_loss"] for h in runs[0].history] == [h["batch_loss"] for h in runs[1].history]
    real_step, calls = train_mod.train_step, []

    def poisoned(model_, *args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            model_.params["h.1.mlp.c_fc.lora_A"][0, 0] = np.inf
        return real_step(model_, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    model, opt = fresh(tiny_sms_cfg)
    with pytest.raises(TrainingDiverged, match="at step 9 "):
        train_classifier(model, opt, train, val, TrainConfig(epochs=1, eval_iter=1, sync_every=7), progress=False)


def test_last_real_token_pooling_does_not_depend_on_padding(sms_data, tiny_sms_cfg):
    """Attention is causal, so the logits at the last real token ignore the pads after it:
    book padding and per-batch padding give the same training run."""
    from dataclasses import replace

    results = []
    for pad in ("dataset", "longest_in_batch"):
        train = replace(sms_data.train, texts=sms_data.train.texts[:80], labels=sms_data.train.labels[:80],
                        token_ids=sms_data.train.token_ids[:80])
        tl, vl, _ = make_loaders(replace(sms_data, train=train), 8, seed=123, pad_to=pad)
        model, opt = fresh(tiny_sms_cfg)
        state = train_classifier(model, opt, tl, vl, TrainConfig(epochs=1, eval_iter=2, pool="last_real"),
                                 progress=False)
        results.append(state)
    a, b = results
    np.testing.assert_allclose([h["batch_loss"] for h in a.history], [h["batch_loss"] for h in b.history], rtol=1e-4)
    assert a.epochs[0]["val_accuracy"] == b.epochs[0]["val_accuracy"]
