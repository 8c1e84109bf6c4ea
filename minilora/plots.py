"""The book's training plots: train vs validation against epochs, examples (or tokens) seen on top.

Raschka's ``plot_values`` (chapter 6) and ``plot_losses`` (chapters 5 and 7): one line
per split against epochs on the bottom axis, with a second, invisible plot on a twin
top axis so that the top ticks read "examples seen" (chapter 6) or "tokens seen"
(chapters 5 and 7). matplotlib runs headless (the Agg backend).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_path  # noqa: E402


def plot_values(epochs_seen, examples_seen, train_values, val_values, path, label="loss", seen="examples_seen"):
    """Write a PNG of train/val `label` against epochs (bottom) and `seen` (top: the
    values examples_seen, named by `seen`, "examples_seen" or "tokens_seen").

    A line needs two points: with fewer (one epoch's accuracy) each value is drawn as a
    marker, or the plot would be empty."""
    marker = "o" if len(epochs_seen) < 2 else None
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, marker=marker, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", marker=marker, label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # same curve, the `seen` counts on the top axis
    ax2.plot(examples_seen, train_values, alpha=0)
    ax2.set_xlabel(seen.replace("_", " ").capitalize())
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")  # the temporary's name ends in .part
    finally:
        plt.close(fig)
    return path


def plot_run(state, examples_per_epoch, folder, epoch_metrics=("accuracy",), seen="examples_seen"):
    """loss.png, and m.png for each m of epoch_metrics (a task's: train_m / val_m recorded
    after each epoch), of a finished LoopState into `folder`; returns their paths. seen:
    the top axis of loss.png, "examples_seen" (the book's chapter 6) or "tokens_seen"
    (chapter 7)."""
    evals = state.evals
    epochs = [e["examples_seen"] / examples_per_epoch for e in evals]
    paths = [plot_values(epochs, [e[seen] for e in evals], [e["train_loss"] for e in evals],
                         [e["val_loss"] for e in evals], folder / "loss.png", "loss", seen)]
    ends = state.epochs
    for metric in epoch_metrics:
        paths.append(plot_values([e["epoch"] for e in ends], [e["examples_seen"] for e in ends],
                                 [e[f"train_{metric}"] for e in ends], [e[f"val_{metric}"] for e in ends],
                                 folder / f"{metric}.png", metric))
    return tuple(paths)
