"""What the training loop asks of a job, and the first job: classification.

The book reuses one training loop across its chapters by putting what differs in the
data and in a few small functions around the loss; minilora.train.train does the same.
A task is any object with

    name                       recorded in the checkpoint: a run resumes only as the
                               task that wrote it
    step(model, batch)         forward (keeping the cache) and loss of one training
                               batch -> (loss as a 0-d array, dlogits for model.backward)
    evaluate(model, batches)   mean loss over `batches` -> {"loss": float, ...}, the model
                               in eval mode and left in train mode
    end_of_epoch(model, train_batches, val_batches)
                               what to record after each epoch -> (dict of values, one
                               line to log or None): the classifier's accuracies (the
                               book's chapter 6), a sample answer (chapter 7)
    epoch_metrics              the names m whose train_m / val_m end_of_epoch records
                               (plotted as m.png); () for none

A batch is a tuple whose first entry is the (B, T) token ids: the loop counts examples
(B) and tokens (B*T, padding included, as the book's tokens_seen) from it, and passes the
whole tuple to the task, so a task's batch carries its own targets.
"""

import numpy as np

from .backend import to_numpy
from .errors import OptionError
from .layers import cross_entropy_backward, cross_entropy_forward

POOLS = ("last", "last_real")


def _positions(idx, last_index, pool):
    return np.full(idx.shape[0], idx.shape[1] - 1) if pool == "last" else np.asarray(last_index)


def batch_logits(model, idx, last_index, pool="last", keep_cache=False):
    """Class logits (B, K) read at one position per text: the last (pool "last", the
    book's) or each text's last real token (pool "last_real")."""
    return model.forward(idx, keep_cache=keep_cache, positions=_positions(idx, last_index, pool))


def evaluate(model, batches, num_batches=None, pool="last"):
    """Mean loss and accuracy over the first num_batches of `batches` (all when None) of
    (idx (B, T), labels (B,), last_index (B,)) batches -> (loss, accuracy), NaN for none."""
    model.eval()
    losses, correct, total = [], 0, 0
    try:
        for i, (idx, labels, last_index) in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            logits = batch_logits(model, idx, last_index, pool)  # [B, K]
            loss, _ = cross_entropy_forward(logits, model.xp.asarray(labels))
            losses.append(float(loss))
            correct += int((to_numpy(logits.argmax(axis=-1)) == labels).sum())
            total += len(labels)
    finally:
        model.train()
    if not total:
        return float("nan"), float("nan")
    return float(np.mean(losses)), correct / total


class ClassificationTask:
    """The book's appendix E: cross-entropy of the class logits at one position per text.

    Batches are (idx (B, T), labels (B,), last_index (B,)), as minilora.data.collate makes.
    loss = mean_b -log softmax(logits[b])[labels[b]]; dlogits = (softmax - onehot) / B.
    """

    name = "classification"
    epoch_metrics = ("accuracy",)

    def __init__(self, pool="last"):
        if pool not in POOLS:
            raise OptionError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool

    def step(self, model, batch):
        idx, labels, last_index = batch
        logits = batch_logits(model, idx, last_index, self.pool, keep_cache=True)  # [B, K]
        loss, cache = cross_entropy_forward(logits, model.xp.asarray(labels))
        (dlogits,) = cross_entropy_backward(1.0, cache)  # [B, K]
        return loss, dlogits

    def evaluate(self, model, batches):
        loss, accuracy = evaluate(model, batches, pool=self.pool)
        return {"loss": loss, "accuracy": accuracy}

    def end_of_epoch(self, model, train_batches, val_batches):
        train_accuracy = self.evaluate(model, train_batches)["accuracy"]
        val_accuracy = self.evaluate(model, val_batches)["accuracy"]
        line = f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%"
        return {"train_accuracy": train_accuracy, "val_accuracy": val_accuracy}, line
