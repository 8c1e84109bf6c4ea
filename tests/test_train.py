"""The training loop on the real SMS data with a tiny GPT-2: the book's schedule of
evaluations, exact resume after an interruption, divergence handling."""

import json

import numpy as np
import pytest

import minilora as ml
from minilora import tasks as tasks_mod
from minilora import checkpoint
from minilora import train as train_mod
from minilora.data import BatchLoader, make_loaders
from minilora.errors import CheckpointStateError
from minilora.tasks import ClassificationTask
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
    real_evaluate, calls = tasks_mod.evaluate, []

    def evaluate_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first evaluation of step 9
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(tasks_mod, "evaluate", evaluate_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(model, opt, train, val, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    monkeypatch.setattr(tasks_mod, "evaluate", real_evaluate)
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
        state = train_classifier(model, opt, tl, vl, TrainConfig(epochs=1, eval_iter=2), pool="last_real",
                                 progress=False)
        results.append(state)
    a, b = results
    np.testing.assert_allclose([h["batch_loss"] for h in a.history], [h["batch_loss"] for h in b.history], rtol=1e-4)
    assert a.epochs[0]["val_accuracy"] == b.epochs[0]["val_accuracy"]


# ---------------------------------------------------------------------------- a second task, the same loop


class RandomSequences:
    """N random token sequences of 3..8 tokens (V=11), for next-token prediction: what the
    loop and BatchLoader need of a split (len, lengths)."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.token_ids = [list(rng.integers(0, 11, size=rng.integers(3, 9))) for _ in range(n)]

    def __len__(self):
        return len(self.token_ids)

    @property
    def lengths(self):
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)


def next_token_collate(split, indices):
    """(inputs (B, T), targets (B, T)): each sequence shifted by one, padded per batch with
    token 0 in the inputs and with a repeat of the last target (a real token) in the
    targets, so that this test needs no masked loss (which is not in minilora yet)."""
    seqs = [split.token_ids[i] for i in indices]
    T = max(len(s) for s in seqs) - 1
    inputs = np.zeros((len(seqs), T), dtype=np.int64)
    targets = np.zeros((len(seqs), T), dtype=np.int64)
    for row, s in enumerate(seqs):
        inputs[row, :len(s) - 1] = s[:-1]
        targets[row, :len(s) - 1] = s[1:]
        targets[row, len(s) - 1:] = s[-1]
    return inputs, targets


class NextTokenTask:
    """Next-token cross-entropy over the flattened (B*T, V) logits of the tied LM head:
    loss = mean over B*T positions of -log softmax(logits)[target]; the backward of the
    reshape is the reshape back. After each epoch: the greedy next token of a fixed
    prompt (the book's sample answer, in miniature)."""

    name = "next_token"
    epoch_metrics = ()
    prompt = np.array([[1, 3, 3, 7]])

    def step(self, model, batch):
        from minilora.layers import cross_entropy_backward, cross_entropy_forward

        inputs, targets = batch
        B, T = inputs.shape
        logits = model.forward(inputs, keep_cache=True)  # [B, T, V]
        V = logits.shape[-1]
        loss, cache = cross_entropy_forward(logits.reshape(B * T, V), model.xp.asarray(targets.reshape(B * T)))
        (dflat,) = cross_entropy_backward(1.0, cache)  # [B*T, V]
        return loss, dflat.reshape(B, T, V)

    def evaluate(self, model, batches):
        from minilora.layers import cross_entropy_forward

        model.eval()
        try:
            losses = [float(cross_entropy_forward(model.forward(x, keep_cache=False).reshape(-1, 11),
                                                  model.xp.asarray(y.reshape(-1)))[0]) for x, y in batches]
        finally:
            model.train()
        return {"loss": float(np.mean(losses))}

    def end_of_epoch(self, model, train_batches, val_batches):
        model.eval()
        try:
            token = int(ml.to_numpy(model.forward(self.prompt, keep_cache=False))[0, -1].argmax())
        finally:
            model.train()
        return {"next_token": token}, f"next token after {self.prompt[0].tolist()}: {token}"


LM_CFG = ml.GPTConfig(vocab_size=11, context_length=9, emb_dim=8, n_heads=2, n_layers=2, drop_rate=0.1)


def fresh_lm(with_lora=True):
    model = ml.GPTModel(LM_CFG, seed=0, dtype="float64")
    if with_lora:
        ml.apply_lora(model, rank=2, alpha=2, targets="attention", seed=1)
    return model, ml.AdamW(model, lr=2e-2, weight_decay=0.1)


def lm_loaders(batching="by_length"):
    train = BatchLoader(RandomSequences(21, seed=5), 4, collate_fn=next_token_collate, shuffle=True,
                        drop_last=True, seed=9, batching=batching)
    val = BatchLoader(RandomSequences(7, seed=6), 4, collate_fn=next_token_collate)
    return train, val


def test_a_language_model_task_trains_through_the_same_loop_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A task other than classification (next-token prediction with the tied head, dropout
    on, batches padded per batch and grouped by length) through the same train(): the
    loss falls, tokens are counted, the task is recorded in the checkpoint, and a run
    interrupted mid-epoch resumes to the uninterrupted one bit for bit."""
    from minilora.train import train

    cfg = TrainConfig(epochs=3, eval_freq=4, eval_iter=2)
    train_loader, val_loader = lm_loaders()
    model_s, opt_s = fresh_lm()
    lines = []
    straight = train(model_s, opt_s, NextTokenTask(), train_loader, val_loader, cfg, log=lines.append, progress=False)
    assert straight.step == 3 * 5 and straight.examples_seen == 3 * 20
    # B*T of every batch, padding included: T is each batch's longest sequence less one
    tokens = sum(x.size for e in range(3) for x, _ in train_loader.epoch_batches(e))
    assert straight.tokens_seen == tokens and straight.history[-1]["tokens_seen"] == tokens
    assert straight.evals[-1]["train_loss"] < straight.evals[0]["train_loss"]
    assert [set(e) for e in straight.epochs] == [{"epoch", "examples_seen", "tokens_seen", "next_token"}] * 3
    assert sum(line.startswith("next token after [1, 3, 3, 7]: ") for line in lines) == 3

    model, opt = fresh_lm()
    real_step, calls = train_mod.train_step, []

    def step_then_interrupt(*args, **kwargs):
        if len(calls) == 7:  # the third batch of the second epoch
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(model, opt, NextTokenTask(), train_loader, val_loader, cfg, checkpoint_dir=tmp_path / "ckpt",
              progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    saved = json.loads((tmp_path / "ckpt" / "state.json").read_text())["loop"]
    assert (saved["epoch"], saved["batch"], saved["step"], saved["task"]) == (1, 2, 7, "next_token")

    model2, opt2 = fresh_lm(with_lora=False)
    state = load_checkpoint(tmp_path / "ckpt", model2, opt2)
    with pytest.raises(CheckpointStateError, match="written by a next_token run; it cannot continue as a "
                                                   "classification run"):
        train(model2, opt2, ClassificationTask(), train_loader, val_loader, cfg, state=state, progress=False)
    resumed = train(model2, opt2, NextTokenTask(), train_loader, val_loader, cfg, checkpoint_dir=tmp_path / "ckpt",
                    state=state, progress=False)
    assert [h["batch_loss"] for h in resumed.history] == [h["batch_loss"] for h in straight.history]
    assert resumed.evals == straight.evals and resumed.epochs == straight.epochs
    assert resumed.tokens_seen == straight.tokens_seen
    for n in model_s.lora.param_names:
        np.testing.assert_array_equal(model2.params[n], model_s.params[n], err_msg=n)


def test_a_checkpoint_written_before_tokens_seen_and_task_resumes(sms_data, tiny_sms_cfg, tmp_path):
    """A state.json whose loop state lacks tokens_seen and task (as minilora wrote them
    before one loop served two tasks) resumes as the classifier it was, to the same run;
    its tokens are not counted (None), since the earlier steps cannot be recounted."""
    cfg = TrainConfig(epochs=2, eval_freq=9, eval_iter=2)
    train, val, _ = small_loaders(sms_data)
    model_s, opt_s = fresh(tiny_sms_cfg)
    straight = train_classifier(model_s, opt_s, train, val, cfg, progress=False)
    tokens = sum(int(train.batch_lengths(e).sum()) * 8 for e in range(2))
    assert straight.tokens_seen == tokens

    model, opt = fresh(tiny_sms_cfg)
    train_classifier(model, opt, train, val, TrainConfig(epochs=1, eval_freq=9, eval_iter=2),
                     checkpoint_dir=tmp_path / "ckpt", progress=False)
    state_file = tmp_path / "ckpt" / "state.json"
    meta = json.loads(state_file.read_text())
    for key in ("tokens_seen", "task"):
        del meta["loop"][key]
    for row in meta["loop"]["history"] + meta["loop"]["evals"] + meta["loop"]["epochs"]:
        del row["tokens_seen"]
    state_file.write_text(json.dumps(meta))
    (tmp_path / "ckpt" / "manifest.json").unlink()  # nor a manifest: minilora wrote none then

    model2, opt2 = fresh(tiny_sms_cfg)
    ml.remove_lora(model2)
    state = load_checkpoint(tmp_path / "ckpt", model2, opt2)
    assert (state.task, state.tokens_seen) == ("classification", None)
    resumed = train_classifier(model2, opt2, train, val, cfg, checkpoint_dir=tmp_path / "ckpt", state=state,
                               progress=False)
    assert [h["batch_loss"] for h in resumed.history] == [h["batch_loss"] for h in straight.history]

    def without_tokens(rows):
        return [{k: v for k, v in r.items() if k != "tokens_seen"} for r in rows]

    assert without_tokens(resumed.evals) == without_tokens(straight.evals)
    assert without_tokens(resumed.epochs) == without_tokens(straight.epochs)
    assert resumed.tokens_seen is None and resumed.history[-1]["tokens_seen"] is None
    for n in model_s.lora.param_names:
        np.testing.assert_array_equal(model2.params[n], model_s.params[n], err_msg=n)


def test_a_damaged_state_file_is_named_with_what_it_lacks(tiny_cfg, tmp_path):
    model = ml.GPTModel(tiny_cfg, seed=0).replace_head(2)
    ml.apply_lora(model, rank=2, alpha=2)
    opt = ml.AdamW(model)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, opt, checkpoint.LoopState(step=1))
    state_file = tmp_path / "ckpt" / "state.json"
    (tmp_path / "ckpt" / "manifest.json").unlink()  # what the state file's own check says, not the manifest's
    meta = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "optimizer"}))
    with pytest.raises(CheckpointStateError, match=f"^{state_file}: optimizer: missing \\(expected an object\\)$"):
        load_checkpoint(tmp_path / "ckpt", model, opt)
    state_file.write_text(json.dumps({**meta, "loop": {**meta["loop"], "future_field": 1}}))
    with pytest.raises(CheckpointStateError, match=f"^{state_file}: loop.future_field: not a key of a loop state"):
        checkpoint.read_loop_state(tmp_path / "ckpt")
