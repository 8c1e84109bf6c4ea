"""Full fine-tuning of the classifier (every parameter, both embeddings and the new head)
follows torch.optim.AdamW's trajectory on the same GPT-2 written in PyTorch with
autograd: the `full` setup of `minilora bench --compare`. Skipped unless torch is installed."""

import numpy as np
import pytest

import minilora as ml

torch = pytest.importorskip("torch")
F = torch.nn.functional

from test_parity_torch import torch_gpt2  # noqa: E402  (the independent torch GPT-2)


def test_full_finetuning_adamw_trajectory_matches_torch(tiny_cfg):
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64").replace_head(2)
    assert sorted(model.trainable) == sorted(model.params)  # nothing frozen
    P = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in model.params.items()}
    topt = torch.optim.AdamW([P[n] for n in model.trainable], lr=1e-2, weight_decay=0.1)
    opt = ml.AdamW(model, lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(2)
    key_noise = 0.0  # the largest key-bias gradient so far, either implementation's (see below)
    for step in range(4):
        idx = rng.integers(0, tiny_cfg.vocab_size, size=(3, 6))
        labels = rng.integers(0, 2, size=3)
        positions = np.full(3, 5)  # the classifier reads the last position, as the benchmark does
        logits = model.forward(idx, positions=positions)  # [B, 2]
        loss, cache = ml.layers.cross_entropy_forward(logits, labels)
        grads = model.backward(ml.layers.cross_entropy_backward(1.0, cache)[0])
        assert set(grads) == set(model.params)
        tloss = F.cross_entropy(torch_gpt2(P, torch.tensor(idx), tiny_cfg)[:, -1, :], torch.tensor(labels))
        topt.zero_grad()
        tloss.backward()
        assert float(loss) == pytest.approx(tloss.item(), rel=1e-12)
        for n in model.trainable:
            np.testing.assert_allclose(grads[n], P[n].grad.numpy(), rtol=1e-8, atol=1e-13, err_msg=f"{step} {n}")
        # The key bias adds q . b_k to every score of a query's row, which the softmax
        # ignores: its exact gradient is zero, and each implementation's is rounding noise
        # (different in each). AdamW moves a parameter by at most lr |m_hat| / eps a step
        # (|m_hat / (sqrt(v_hat) + eps)| <= |m_hat| / eps), and m_hat is a weighted mean of
        # the gradients so far, so |m_hat| <= G, the largest noise seen: after t steps each
        # implementation's key bias lies within t lr G / eps of its start, and the two within
        # twice that. (A flat 1e-12 failed on rounding alone, 1.35e-12, once the layers'
        # operations were regrouped; the bound reaches ~9e-12 by the fourth step here.)
        C = tiny_cfg.emb_dim
        for i in range(tiny_cfg.n_layers):
            name = f"h.{i}.attn.c_attn.bias"
            noise = max(np.abs(grads[name][C:2 * C]).max(), np.abs(P[name].grad.numpy()[C:2 * C]).max())
            assert noise < 1e-15
            key_noise = max(key_noise, noise)
        opt.step(grads)
        topt.step()
        key_bound = 2 * (step + 1) * 1e-2 * key_noise / 1e-8  # t lr G / eps, for both
        for n in model.params:
            ours, theirs = model.params[n], P[n].detach().numpy()
            if n.endswith("attn.c_attn.bias"):  # the key slice: the bound above; q and v: as every other
                np.testing.assert_allclose(ours[C:2 * C], theirs[C:2 * C], rtol=0, atol=max(key_bound, 1e-15),
                                           err_msg=f"{step} {n} key slice")
                ours, theirs = np.delete(ours, np.s_[C:2 * C]), np.delete(theirs, np.s_[C:2 * C])
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12, err_msg=f"{step} {n}")
