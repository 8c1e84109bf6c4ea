"""Parity with an independent reference: GPT-2 (and LoRA) written in PyTorch with
autograd, from the same arrays. Skipped unless torch happens to be installed."""

import math

import numpy as np
import pytest

import minilora as ml

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_gpt2(P, idx, cfg, lora=None):
    """GPT-2 forward in torch from a dict of float64 tensors (HF names, (in, out) weights).
    lora: dict prefix -> (A, B, scale) adapters, Q/K/V as column blocks of c_attn."""
    lora = lora or {}

    def lin(name, x):
        y = x @ P[name + ".weight"] + (P[name + ".bias"] if name + ".bias" in P else 0)
        if name.endswith("c_attn"):  # three adapters over the Q|K|V column blocks
            C = x.shape[-1]
            deltas = []
            for part in "qkv":
                A, B, s = lora.get(f"{name}.{part}", (None, None, 0.0))
                deltas.append(s * (x @ A) @ B if A is not None else torch.zeros_like(y[..., :C]))
            y = y + torch.cat(deltas, dim=-1)
        elif name in lora:
            A, B, s = lora[name]
            y = y + s * (x @ A) @ B
        return y

    B_, T = idx.shape
    C, NH = cfg.emb_dim, cfg.n_heads
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        a = F.layer_norm(x, (C,), P[h + "ln_1.weight"], P[h + "ln_1.bias"], 1e-5)
        q, k, v = lin(h + "attn.c_attn", a).split(C, dim=-1)
        q, k, v = (t.view(B_, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // NH)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(B_, T, C)
        x = x + lin(h + "attn.c_proj", a)
        m = F.layer_norm(x, (C,), P[h + "ln_2.weight"], P[h + "ln_2.bias"], 1e-5)
        m = F.gelu(lin(h + "mlp.c_fc", m), approximate="tanh")
        x = x + lin(h + "mlp.c_proj", m)
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
    if "out_head.weight" in P:
        return lin("out_head", x)
    logits = x @ P["wte.weight"].T  # the tied LM head
    if "lm_head" in lora:  # its adapter beside wte
        A, B, s = lora["lm_head"]
        logits = logits + s * (x @ A) @ B
    return logits


def test_logits_and_all_gradients_match_torch(tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    G = np.random.default_rng(0).standard_normal((2, 5, tiny_cfg.vocab_size))
    logits = model.forward(tiny_idx)
    grads = model.backward(G)
    P = {n: torch.tensor(p, requires_grad=True) for n, p in model.params.items()}
    tl = torch_gpt2(P, torch.tensor(tiny_idx), tiny_cfg)
    (tl * torch.tensor(G)).sum().backward()
    np.testing.assert_allclose(logits, tl.detach().numpy(), rtol=0, atol=1e-12)
    for n in model.params:
        np.testing.assert_allclose(grads[n], P[n].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=n)


def follow_torch(model, cfg, losses, steps=4, rtol=1e-10):
    """Run AdamW on `model` and on the same values in torch for `steps` batches; at each step
    the losses and every gradient agree, and at the end every parameter. losses(rng, logits,
    tl) draws a batch's targets and returns (loss, dlogits, torch loss)."""
    P = {n: torch.tensor(p.copy(), requires_grad=n in model.trainable) for n, p in model.params.items()}
    s = model.lora.scale
    topt = torch.optim.AdamW([P[n] for n in model.trainable], lr=1e-2, weight_decay=0.1)
    opt = ml.AdamW(model, lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(1)
    for step in range(steps):
        idx = rng.integers(0, cfg.vocab_size, size=(3, 6))
        logits = model.forward(idx)
        adapters = {ad.prefix: (P[ad.prefix + ".lora_A"], P[ad.prefix + ".lora_B"], s) for ad in model.lora.adapters}
        tl = torch_gpt2(P, torch.tensor(idx), cfg, adapters)
        loss, dlogits, tloss = losses(rng, logits, tl)
        grads = model.backward(dlogits)
        topt.zero_grad()
        tloss.backward()
        assert float(loss) == pytest.approx(tloss.item(), rel=1e-12)
        for n in model.trainable:
            np.testing.assert_allclose(grads[n], P[n].grad.numpy(), rtol=1e-8, atol=1e-13, err_msg=f"{step} {n}")
        opt.step(grads)
        topt.step()
    for n in model.params:
        np.testing.assert_allclose(model.params[n], P[n].detach().numpy(), rtol=rtol, atol=1e-13, err_msg=n)


def test_lora_logits_gradients_and_adamw_trajectory_match_torch(tiny_cfg):
    """Same initial LoRA values and batches: same logits, gradients and AdamW trajectory."""
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64").replace_head(2)
    ml.apply_lora(model, rank=2, alpha=2, targets="all")

    def last_position_loss(rng, logits, tl):
        labels = rng.integers(0, 2, size=3)
        loss, cache = ml.layers.cross_entropy_forward(logits[:, -1, :], labels)
        dlogits = np.zeros_like(logits)
        dlogits[:, -1] = ml.layers.cross_entropy_backward(1.0, cache)[0]
        return loss, dlogits, F.cross_entropy(tl[:, -1, :], torch.tensor(labels))

    follow_torch(model, tiny_cfg, last_position_loss)


def test_lora_language_model_with_the_head_adapter_follows_torch(tiny_cfg):
    """Instruction tuning's step: LoRA on every linear and the tied LM head, the masked
    token loss (ignore_index -100), AdamW: 4 steps equal torch's trajectory."""
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    ml.apply_lora(model, rank=2, alpha=2, scaling="alpha", targets="all")
    assert "lm_head" in model.lora.targets

    def masked_token_loss(rng, logits, tl):
        targets = rng.integers(0, tiny_cfg.vocab_size, size=(3, 6))
        targets[0, 4:] = targets[2, 5:] = -100  # padding, ignored
        loss, cache = ml.layers.masked_cross_entropy_forward(logits, targets)
        tloss = F.cross_entropy(tl.flatten(0, 1), torch.tensor(targets).flatten(), ignore_index=-100)
        return loss, ml.layers.masked_cross_entropy_backward(1.0, cache)[0], tloss

    # 4 AdamW steps in float64: ~1e-15 of rounding per step, amplified where a gradient is ~0
    # (the update is then a ratio of two tiny moments); 1e-9 leaves room, a wrong step is off by ~lr
    follow_torch(model, tiny_cfg, masked_token_loss, rtol=1e-9)
