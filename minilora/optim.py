"""AdamW with exactly torch.optim.AdamW's update, gradient clipping, learning-rate schedules.

One step t (1-based) for a parameter p with gradient g (Loshchilov & Hutter 2019,
and torch's single-tensor ``_single_tensor_adamw``):

    p  <- p * (1 - lr * wd)                         decoupled weight decay
    m  <- b1 * m + (1 - b1) * g
    v  <- b2 * v + (1 - b2) * g^2
    p  <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

eps is added after the square root and the bias corrections, as torch does; this is
the textbook p <- p - lr * m_hat / (sqrt(v_hat) + eps) rearranged (the proof, and why the
bias correction: docs/derivations.md#adamw). Every trained tensor is decayed (the book
passes model.parameters() with weight_decay=0.1).
"""

import math

import numpy as np

from .backend import get_array_module, to_device, to_numpy


def constant_schedule(lr):
    """lr(step) = lr."""
    return lambda step: lr


def warmup_cosine_schedule(lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warmup from lr/warmup_steps up to lr over `warmup_steps` steps, then a
    cosine decay from lr to min_lr at `total_steps` (constant after). Steps are 1-based."""
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError("need total_steps >= 1 and warmup_steps >= 0")

    def schedule(step):
        if step <= warmup_steps:
            return lr * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

    return schedule


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm
    (torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), capped at 1).
    Returns the norm before clipping, as a 0-d array (no host sync on the GPU)."""
    if not grads:
        return 0.0
    xp = get_array_module(next(iter(grads.values())))
    total = xp.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads.values():
        g *= coef.astype(g.dtype)
    return total


def _check_lr(lr):
    """A learning rate must be finite and >= 0 (a negative one climbs the loss)."""
    if not (isinstance(lr, (int, float, np.number)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"AdamW learning rate must be a finite number >= 0, got {lr!r}")
    return lr


class AdamW:
    """AdamW over `model.params`, updating the parameters named in the grads dict.

    lr: a float or a schedule (a function of the 1-based step returning the lr).
    max_grad_norm: clip the global gradient norm to this before each step (None = off).
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 max_grad_norm=None):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not callable(lr):
            _check_lr(lr)
        for name, value in (("eps", eps), ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AdamW {name} must be a finite number >= 0, got {value!r}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"AdamW max_grad_norm must be a finite number > 0 (or None), got {max_grad_norm!r}")
        self.model = model
        self.schedule = lr if callable(lr) else constant_schedule(lr)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.max_grad_norm = max_grad_norm
        self.step_count = 0
        self.last_lr = None  # the learning rate of the latest step
        self.m, self.v = {}, {}  # first and second moments, per parameter name

    @property
    def lr(self):
        """The learning rate the next step will use."""
        return self.schedule(self.step_count + 1)

    def step(self, grads):
        """Apply one AdamW update to every parameter named in `grads` (in place).

        Gradients are not modified unless clipping is on (then they are scaled in place).
        Returns the gradient norm before clipping when clipping is on, else None.
        """
        params = self.model.params
        unknown = [n for n in grads if n not in params]
        if unknown:
            raise KeyError(f"gradients for unknown parameters: {unknown[:5]}")
        lora = getattr(self.model, "lora", None)
        if lora is not None and lora.merged and any(n in grads for n in lora.param_names):
            # merged weights hold W + s*A@B of the old A, B: unmerging after a step on A, B
            # would subtract the new product and leave W corrupted
            raise RuntimeError("LoRA adapters are merged into the weights: unmerge_lora(model) before "
                               "an optimizer step on them")
        lr = _check_lr(self.schedule(self.step_count + 1))
        norm = clip_grad_norm(grads, self.max_grad_norm) if self.max_grad_norm else None
        self.step_count += 1
        t = self.step_count
        self.last_lr = lr
        b1, b2 = self.betas
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for name, g in grads.items():
            p = params[name]
            xp = get_array_module(p)
            if name not in self.m:
                self.m[name] = xp.zeros_like(p)
                self.v[name] = xp.zeros_like(p)
            m, v = self.m[name], self.v[name]
            p *= 1.0 - lr * self.weight_decay
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = xp.sqrt(v)
            denom /= bc2_sqrt
            denom += self.eps
            p -= step_size * (m / denom)
        return norm

    def state_dict(self):
        """Everything needed to resume exactly: step count, hyperparameters, moments
        (as NumPy arrays)."""
        return {"step": self.step_count, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                "m": {n: to_numpy(a) for n, a in self.m.items()},
                "v": {n: to_numpy(a) for n, a in self.v.items()}}

    def load_state_dict(self, state):
        """Restore a state_dict (moments moved to the model's device and dtype)."""
        params = self.model.params
        missing = [n for n in state["m"] if n not in params]
        if missing:
            raise KeyError(f"optimizer state for parameters the model lacks: {missing[:5]}")
        for n, a in state["m"].items():
            if tuple(np.shape(a)) != tuple(params[n].shape):
                raise ValueError(f"optimizer state for {n} has shape {np.shape(a)}, parameter has {params[n].shape}")
        self.step_count = int(state["step"])
        self.betas, self.eps = tuple(state["betas"]), state["eps"]
        self.weight_decay, self.max_grad_norm = state["weight_decay"], state["max_grad_norm"]
        device, dtype = self.model.device, self.model.dtype
        self.m = {n: to_device(a, device, dtype) for n, a in state["m"].items()}
        self.v = {n: to_device(a, device, dtype) for n, a in state["v"].items()}
