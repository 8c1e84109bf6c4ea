"""The life of a LoRA adapter: train, merge, unmerge, disable/enable, save, load.

    python examples/04_lora_merge.py

A LoRA linear computes y = x @ W + b + s * (x @ A) @ B. Merging folds s * A @ B into W
(W' = W + s A B): the same function with no adapter work left. The adapter itself is
small: saved on its own, it is a fraction of the model's bytes, and loading it into a
fresh copy of the same base model gives back the same classifier.
See docs/derivations.md#lora and docs/diagrams.md.
"""

import tempfile
from pathlib import Path

import numpy as np

import minilora as ml
from minilora.layers import cross_entropy_backward, cross_entropy_forward
from minilora.config import param_shapes

V, T, X = 16, 10, 7  # the task of example 03: does the sequence contain token 7?
rng = np.random.default_rng(0)
train_idx = rng.integers(0, V, size=(1024, T))
train_y = (train_idx == X).any(axis=1).astype(np.int64)
test_idx = rng.integers(0, V, size=(256, T))
last = np.full(len(test_idx), T - 1)  # classify from the last position
cfg = ml.GPTConfig(vocab_size=V, context_length=T, emb_dim=32, n_heads=4, n_layers=2)


def base_model():
    """The same 'pretrained' model every time: seed 0, with a 2-class head."""
    return ml.GPTModel(cfg, seed=0).replace_head(num_classes=2, seed=123).eval()


def logits_of(model):
    return model.forward(test_idx, keep_cache=False, positions=last)  # [256, 2]


model = base_model()
base_logits = logits_of(model)
ml.apply_lora(model, rank=4, alpha=8, targets="all", seed=123)
print(f"B = 0 at init, so the adapter starts as a no-op: max |logits - base| = "
      f"{np.abs(logits_of(model) - base_logits).max():.1e}")

# train the adapter briefly (as in example 03)
model.train()
opt = ml.AdamW(model, lr=1e-2, weight_decay=0.1)
for step in range(100):
    rows = rng.integers(0, len(train_idx), size=64)
    loss, cache = cross_entropy_forward(model.forward(train_idx[rows], positions=np.full(64, T - 1)), train_y[rows])
    opt.step(model.backward(cross_entropy_backward(1.0, cache)[0]))
model.eval()
lora_logits = logits_of(model)
print(f"trained 100 steps (loss {float(loss):.4f}); the adapter moved the logits by "
      f"max {np.abs(lora_logits - base_logits).max():.2f}")

w = model.params["h.0.mlp.c_fc.weight"]
w_before = w.copy()
ml.merge_lora(model)  # W += s * A @ B for every adapter; the forward now skips the adapters
w_merged_max = float(np.abs(w).max())  # the size of the merged float32 values, for the rounding below
print(f"\nmerged:    max |logits - LoRA logits| = {np.abs(logits_of(model) - lora_logits).max():.1e}"
      f"   (h.0.mlp.c_fc.weight changed by max {np.abs(w - w_before).max():.3f})")
ml.unmerge_lora(model)  # W -= s * A @ B
print(f"unmerged:  max |logits - LoRA logits| = {np.abs(logits_of(model) - lora_logits).max():.1e}"
      f"   (h.0.mlp.c_fc.weight back to within {np.abs(w - w_before).max():.1e})")
ml.disable_lora(model)  # the adapters are kept but skipped: the base model
print(f"disabled:  max |logits - base logits| = {np.abs(logits_of(model) - base_logits).max():.1e}")
ml.enable_lora(model)
print(f"enabled:   max |logits - LoRA logits| = {np.abs(logits_of(model) - lora_logits).max():.1e}")
# Why "unmerged", "disabled" and "enabled" are not exactly 0: merge and unmerge do not
# round-trip exactly in float32. The merge stores W + s*A@B rounded to float32; the
# unmerge subtracts a (rounded) s*A@B from that rounded sum and rounds again. So W comes
# back only within about eps32 * |W + s*A@B| of what it was (the 1.5e-08 above), and
# every later forward, with the adapters skipped (disabled) or not (enabled), runs on
# that slightly moved W.
eps32 = np.finfo(np.float32).eps
print(f"           (not 0: merge + unmerge round W twice in float32, so W comes back within "
      f"~eps32 * max|W + s A B| = {eps32 * w_merged_max:.1e}, not bit for bit)")

with tempfile.TemporaryDirectory() as tmp:
    folder = ml.save_adapter(model, Path(tmp) / "adapter")  # the adapter and the replaced head
    fresh = ml.GPTModel(cfg, seed=0).eval()  # the same base weights, no head, no LoRA
    ml.load_adapter(fresh, folder)
    print(f"loaded:    max |logits - LoRA logits| = {np.abs(logits_of(fresh) - lora_logits).max():.1e}"
          f"   (a fresh base model + the saved adapter)")
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir())}

n_lora = model.num_params(trainable_only=True)
n_head = model.params["out_head.weight"].size + model.params["out_head.bias"].size
model_bytes = sum(a.nbytes for name, a in model.params.items() if ".lora_" not in name)
print(f"\nsizes: {n_lora:,} LoRA parameters (+ {n_head} of the 2-class head, saved with them) "
      f"next to the model's {model.num_params() - n_lora:,}")
print(f"  adapter folder on disk: {sum(files.values()):,} bytes ({', '.join(f'{n} {s:,}' for n, s in files.items())})")
print(f"  the model's own parameters in float32: {model_bytes:,} bytes")

# the same for the appendix E model, GPT-2 small (shapes only: no weights are made)
big = ml.GPTModel(ml.GPTConfig.from_preset("gpt2-small"), init=False).replace_head(2)
ml.apply_lora(big, rank=16, alpha=16, targets="all")
n_lora = big.num_params(trainable_only=True)
n_base = sum(int(np.prod(shape)) for shape in param_shapes(big.cfg).values()) + 768 * 2 + 2  # + the head
print(f"GPT-2 small, rank 16 on every linear (appendix E): {n_lora:,} LoRA parameters "
      f"({n_lora * 4 / 2**20:.1f} MiB in float32) next to {n_base:,} ({n_base * 4 / 2**20:.0f} MiB)")
