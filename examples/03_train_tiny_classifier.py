"""A tiny GPT-2 learns a classification task in seconds: with LoRA, then fully fine-tuned.

    python examples/03_train_tiny_classifier.py

The task, generated here: a sequence of 10 random tokens (vocabulary 16) is class 1 when
it contains token 7 anywhere, class 0 otherwise (about half and half). The model reads
the sequence and classifies from the last position, as appendix E does: the attention
of the last token has to find a 7 wherever it is. The loop is the whole of training:
forward, cross-entropy, backward, AdamW. Then the same with every parameter trained.
"""

import time

import numpy as np

import minilora as ml
from minilora.layers import cross_entropy_backward, cross_entropy_forward

V, T, X = 16, 10, 7  # vocabulary, sequence length, the token to look for
rng = np.random.default_rng(0)


def make_data(n):
    idx = rng.integers(0, V, size=(n, T))  # [n, T] random tokens
    return idx, (idx == X).any(axis=1).astype(np.int64)  # label: does the sequence contain X?


train_idx, train_y = make_data(2048)
test_idx, test_y = make_data(512)
print(f"task: does a sequence of {T} tokens (vocabulary {V}) contain token {X}? "
      f"{train_y.mean() * 100:.0f}% of the training sequences do")
cfg = ml.GPTConfig(vocab_size=V, context_length=T, emb_dim=32, n_heads=4, n_layers=2)


def accuracy(model, idx, y):
    model.eval()
    logits = model.forward(idx, keep_cache=False, positions=np.full(len(idx), T - 1))  # [n, 2]
    model.train()
    return float((logits.argmax(axis=-1) == y).mean())


for mode, lr in (("LoRA", 1e-2), ("full fine-tuning", 3e-3)):
    model = ml.GPTModel(cfg, seed=0)  # random weights (no download): a tiny GPT-2
    model.replace_head(num_classes=2, seed=123)  # the LM head becomes Linear(C, 2)
    if mode == "LoRA":
        ml.apply_lora(model, rank=4, alpha=8, targets="all", seed=123)  # freezes the rest
    print(f"\n{mode}: {model.num_params(trainable_only=True):,} trainable of {model.num_params():,} parameters; "
          f"test accuracy before training {accuracy(model, test_idx, test_y) * 100:.1f}%")
    opt = ml.AdamW(model, lr=lr, weight_decay=0.1)
    batch, last = 64, np.full(64, T - 1)  # classify from the last position of each sequence
    start = time.perf_counter()
    for step in range(1, 201):
        rows = rng.integers(0, len(train_idx), size=batch)
        logits = model.forward(train_idx[rows], positions=last)  # [batch, 2]
        loss, cache = cross_entropy_forward(logits, train_y[rows])
        (dlogits,) = cross_entropy_backward(1.0, cache)  # [batch, 2]
        grads = model.backward(dlogits)  # only the trainable parameters
        opt.step(grads)
        if step == 1 or step % 25 == 0:
            print(f"  step {step:3d}  loss {float(loss):.4f}")
    print(f"  {mode}: test accuracy {accuracy(model, test_idx, test_y) * 100:.1f}% "
          f"after 200 steps ({time.perf_counter() - start:.1f} s)")
