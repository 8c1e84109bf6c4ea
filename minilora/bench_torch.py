"""The same appendix E LoRA step in PyTorch eager, for comparison. PyTorch is never a
dependency: ``minilora.bench`` imports this module only when torch is installed.

GPT-2 small with random weights, a 2-class head, rank-16 LoRA on Q, K, V (separately),
the attention projection, both MLP layers and the head, AdamW, batch 8 x 120, float32,
classifying from the last position: what ``minilora.bench.build_step`` runs, on the CPU
or a CUDA GPU (``device``).
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, n_in, n_out, r, alpha, bias=True, parts=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_out), requires_grad=False) if bias else None
        width = n_out // parts
        self.A = nn.ParameterList([nn.Parameter(torch.rand(n_in, r) * 2 / math.sqrt(r) - 1 / math.sqrt(r))
                                   for _ in range(parts)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(r, width)) for _ in range(parts)])
        self.scale = alpha / r

    def forward(self, x):
        y = x @ self.weight
        if self.bias is not None:
            y = y + self.bias
        delta = torch.cat([(x @ A) @ B for A, B in zip(self.A, self.B)], dim=-1)
        return y + self.scale * delta


class Block(nn.Module):
    def __init__(self, C, NH, r):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn = LoRALinear(C, 3 * C, r, r, parts=3)
        self.c_proj = LoRALinear(C, C, r, r)
        self.c_fc = LoRALinear(C, 4 * C, r, r)
        self.mlp_proj = LoRALinear(4 * C, C, r, r)
        self.NH = NH

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.NH)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LoRA(nn.Module):
    def __init__(self, V=50257, Tmax=1024, C=768, NH=12, L=12, r=16, n_classes=2):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(Tmax, C)
        self.blocks = nn.ModuleList([Block(C, NH, r) for _ in range(L)])
        self.ln_f = nn.LayerNorm(C)
        self.head = LoRALinear(C, n_classes, r, r)
        for p in [*self.wte.parameters(), *self.wpe.parameters(), *self.ln_f.parameters()]:
            p.requires_grad = False
        for b in self.blocks:
            for p in [*b.ln_1.parameters(), *b.ln_2.parameters()]:
                p.requires_grad = False

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x)[:, -1, :])


def build_torch_step(cfg, batch=8, seq=120, rank=16, device="cpu", seed=0):
    """(step, info): a function running one PyTorch eager LoRA step of the GPT-2 `cfg` (a
    minilora GPTConfig) on `device` ("cpu" or "cuda"), returning when the device is done
    (CUDA runs asynchronously: the step synchronizes), and what to report beside its time."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = GPT2LoRA(cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers, rank).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    idx = torch.tensor(rng.integers(0, cfg.vocab_size, (batch, seq)), device=dev)
    labels = torch.tensor(rng.integers(0, 2, batch), device=dev)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(idx), labels)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "torch_device": device,
            "torch_trainable_params": sum(p.numel() for p in params)}
    return step, info


def time_torch_step(cfg, batch=8, seq=120, rank=16, repeats=5, warmup=2, seed=0, device="cpu"):
    """Median seconds of a PyTorch eager LoRA step (build_torch_step), timed alone: the
    info dict with "torch_step_seconds" added."""
    step, info = build_torch_step(cfg, batch, seq, rank, device, seed)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {**info, "torch_step_seconds": float(np.median(times))}
