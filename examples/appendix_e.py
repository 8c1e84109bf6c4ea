"""Appendix E of "Build a Large Language Model (From Scratch)", with minilora's Python API.

Fine-tunes pretrained GPT-2 small with LoRA (rank 16 on every linear layer) as an
SMS spam classifier. Run it with:

    python examples/appendix_e.py                 # downloads GPT-2 small and the data once
    python examples/appendix_e.py --model PATH    # a local model.safetensors or HF folder

`minilora finetune` does the same with checkpoints, plots and a run folder.
"""

import argparse
import time

import minilora as ml
from minilora.data import load_sms_spam, make_loaders
from minilora.train import TrainConfig, evaluate, train_classifier

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="gpt2-small")
parser.add_argument("--device", default=None)
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

# E.2 the dataset: balanced, split 70/10/20, padded to the longest training text
data = load_sms_spam()
train_loader, val_loader, test_loader = make_loaders(data, batch_size=8, seed=123)
print(f"{len(train_loader)} training batches, {len(val_loader)} validation, {len(test_loader)} test")

# E.3 the pretrained model, with the LM head replaced by a 2-class Linear
model = ml.GPTModel.from_pretrained(args.model, device=args.device)
model.replace_head(num_classes=2, seed=123)
print(f"Total trainable parameters before: {model.num_params(trainable_only=True):,}")

# E.4 LoRA: freeze everything, add rank-16 adapters on every linear layer
ml.apply_lora(model, rank=16, alpha=16, scaling="alpha_over_r", targets="all", seed=123)
print(f"Total trainable LoRA parameters: {model.num_params(trainable_only=True):,}")

for name, loader in (("Training", train_loader), ("Validation", val_loader), ("Test", test_loader)):
    print(f"{name} accuracy before fine-tuning: {evaluate(model, loader.epoch_batches(0), 10)[1] * 100:.2f}%")

# E.5 fine-tuning: AdamW, lr 8e-4 (the notebook's alpha/r scaling), weight decay 0.1
start = time.perf_counter()
optimizer = ml.AdamW(model, lr=8e-4, weight_decay=0.1)
state = train_classifier(model, optimizer, train_loader, val_loader,
                         TrainConfig(epochs=args.epochs, eval_freq=50, eval_iter=5), log=print)
print(f"Training completed in {(time.perf_counter() - start) / 60:.2f} minutes.")

for name, loader in (("Training", train_loader), ("Validation", val_loader), ("Test", test_loader)):
    print(f"{name} accuracy: {evaluate(model, loader.epoch_batches(0))[1] * 100:.2f}%")
