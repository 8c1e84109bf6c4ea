"""GPT-2's hyperparameters: GPTConfig, the four presets, and the parameter shapes they imply.

Its own module so that the model (model.py) and the checkpoint loader (weights.py) can
both read it without importing each other.
"""

from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 hyperparameters, with the field names of Raschka's book."""

    vocab_size: int = 50257  # BPE vocabulary size (50,000 merges + 256 bytes + <|endoftext|>)
    context_length: int = 1024  # longest sequence; rows of the position table
    emb_dim: int = 768  # model width C
    n_heads: int = 12  # attention heads; emb_dim must divide by it
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.0  # dropout on embeddings, attention weights and residual branches
    qkv_bias: bool = True  # GPT-2 checkpoints carry a bias on the fused Q|K|V projection

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")

    @classmethod
    def from_preset(cls, name, **overrides):
        """One of PRESETS ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}
PRESET_ALIASES = {"gpt2": "gpt2-small", "124M": "gpt2-small", "355M": "gpt2-medium",
                  "774M": "gpt2-large", "1558M": "gpt2-xl"}


def param_shapes(cfg):
    """name -> shape of every base parameter, in checkpoint order (HF GPT-2 names)."""
    C, V = cfg.emb_dim, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.context_length, C)}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C),
            **({h + "attn.c_attn.bias": (3 * C,)} if cfg.qkv_bias else {}),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes
