"""minilora: GPT-2 with LoRA fine-tuning in NumPy/CuPy, every backward pass by hand.

    import minilora as ml
    model = ml.GPTModel(ml.GPTConfig.from_preset("gpt2-small"))
    ml.apply_lora(model, rank=16, alpha=16)
"""

from .adapters import AdapterError, load_adapter, save_adapter
from . import reference  # the plain model a learner reads first: ml.reference.forward/backward
from .backend import cuda_available, to_numpy
from .config import PRESETS, GPTConfig
from .lora import (
    apply_lora,
    disable_lora,
    enable_lora,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from .model import GPTModel
from .optim import AdamW, clip_grad_norm, constant_schedule, warmup_cosine_schedule
from .peft import export_peft  # a language model's adapter as a Hugging Face PEFT LoRA folder

__version__ = "0.1.0"

__all__ = [  # the public API (DESIGN.md): what `from minilora import *` gives
    "AdamW", "AdapterError", "GPTConfig", "GPTModel", "PRESETS", "apply_lora", "clip_grad_norm",
    "constant_schedule", "cuda_available", "disable_lora", "enable_lora", "export_peft", "load_adapter",
    "merge_lora", "reference", "remove_lora", "save_adapter", "to_numpy", "unmerge_lora",
    "warmup_cosine_schedule",
]
