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

The update is elementwise, so it runs on all trained tensors at once: the optimizer keeps
them in one flat buffer (one per dtype) and puts views of it into ``model.params`` under
the same names and shapes, with the moments in two buffers alike. A step is then the
lines above once, on whole buffers, instead of once per tensor (146 tensors for the
appendix E adapters, ~8 array operations each: on a GPU each operation is a kernel launch
that costs more than its arithmetic). Each element sees the same operations in the same
order, so the result is the per-tensor update's, bit for bit.
"""

import math

import numpy as np

from .backend import get_array_module, to_device, to_numpy
from .errors import MiniloraError


class OptimizerError(MiniloraError, ValueError):
    """An AdamW setting, or a gradient handed to step(), that cannot give an update:
    refused before anything changes."""


def constant_schedule(lr):
    """lr(step) = lr."""
    return lambda step: lr


def warmup_cosine_schedule(lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warmup from lr/warmup_steps up to lr over `warmup_steps` steps, then a
    cosine decay from lr to min_lr at `total_steps` (constant after). Steps are 1-based."""
    if total_steps < 1 or warmup_steps < 0:
        raise OptimizerError(f"warmup_cosine_schedule needs total_steps >= 1 and warmup_steps >= 0, "
                             f"got {total_steps} and {warmup_steps}")

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
        raise OptimizerError(f"AdamW learning rate must be a finite number >= 0, got {lr!r}")
    return lr


# On the CPU the update runs over the flat buffer a cache-sized piece at a time, so that
# each of its ~10 passes reads from the cache rather than from memory. Measured on the
# appendix E adapters (2.67 M values, float32, 2 busy cores): the whole buffer at once
# 23.6 ms a step, tensor by tensor 10.6 ms, pieces of 2^16 values 10.5 ms (best 6.9 vs
# 9.4). A GPU takes the buffer whole: one launch per operation.
CPU_CHUNK = 1 << 16


def _adamw_update(p, m, v, g, decay, b1, b2, step_size, bc2_sqrt, eps):
    """One AdamW step on flat arrays, in place (the lines of the module docstring)."""
    p *= 1.0 - decay
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * (g * g)
    denom = get_array_module(v).sqrt(v)
    denom /= bc2_sqrt
    denom += eps
    p -= step_size * (m / denom)


def _check_grad_shapes(grads, params):
    """Refuse gradients that are not arrays of their parameter's shape, naming the first.
    One comparison of shapes per tensor: cheap next to the update. A gradient of the right
    size but the wrong shape (a transposed A) would otherwise be applied silently, and one
    of another size would fail only partway through the flat update, after some tensors
    had changed and the step had been counted."""
    wrong = []
    for name, g in grads.items():
        shape = getattr(g, "shape", None)
        if shape is None or tuple(shape) != tuple(params[name].shape):
            got = f"is {type(g).__name__}, not an array" if shape is None else f"has shape {tuple(shape)}"
            wrong.append(f"the gradient of {name} {got}, the parameter has shape {tuple(params[name].shape)}")
    if wrong:
        others = f" (and {len(wrong) - 1} more gradient(s) like it)" if len(wrong) > 1 else ""
        raise OptimizerError(f"AdamW.step: {wrong[0]}{others}; nothing was updated")


class AdamW:
    """AdamW over `model.params`, updating the parameters named in the grads dict.

    lr: a float or a schedule (a function of the 1-based step returning the lr).
    max_grad_norm: clip the global gradient norm to this before each step (None = off).
    From the first step on, the trained entries of model.params are views of the
    optimizer's flat buffer (same names, shapes and dtype); an array put in their place
    later (replace_head, a new adapter, load_adapter) is packed at the next step and
    starts from zero moments, unless load_state_dict has just loaded its moments.
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 max_grad_norm=None):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise OptimizerError(f"AdamW betas must be in [0, 1), got {betas}")
        if not callable(lr):
            _check_lr(lr)
        for name, value in (("eps", eps), ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise OptimizerError(f"AdamW {name} must be a finite number >= 0, got {value!r}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise OptimizerError(f"AdamW max_grad_norm must be a finite number > 0 (or None), "
                                 f"got {max_grad_norm!r}")
        # a model whose every parameter is frozen would take steps that change nothing; a
        # model without `trainable` (anything with a params dict) trains all its params
        if not getattr(model, "trainable", model.params):
            raise OptimizerError("AdamW: the model has nothing to train (model.trainable is empty: every "
                                 "parameter is frozen); apply_lora, or leave some parameters unfrozen, "
                                 "before making the optimizer")
        self.model = model
        self.schedule = lr if callable(lr) else constant_schedule(lr)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.max_grad_norm = max_grad_norm
        self.step_count = 0
        self.last_lr = None  # the learning rate of the latest step
        self.m, self.v = {}, {}  # first and second moments, per parameter name (views of _groups' buffers)
        self._groups = []  # (names, params, m, v): flat buffers of the tensors packed together
        self._views = {}  # name -> the view of a flat buffer the model's params hold
        self._handed = {}  # name -> every view ever put in model.params (not only the current packing's)
        self._loaded = set()  # names whose moments came from load_state_dict, for the next packing

    def _packed(self, names):
        """Whether `names` are exactly the packed tensors, still the arrays the model holds.
        Identity, not equality: apply_lora, replace_head, load_adapter or a user may have
        put a new array under a name, and the buffer must then hold that one."""
        params = self.model.params
        return set(names) == set(self._views) and all(params[n] is self._views[n] for n in names)

    def _pack(self, names):
        """Copy the parameters `names` and their moments into flat buffers, one per dtype,
        and put views of them in model.params and self.m / self.v. A tensor keeps its
        moments if its array is one this optimizer packed before, or if they were just
        loaded (load_state_dict); a new array under a name (a new adapter, a new head)
        starts from zero moments. Tensors no longer trained keep their arrays and moments."""
        params = self.model.params
        self._groups, self._views = [], {}
        for dtype in dict.fromkeys(params[n].dtype for n in names):
            group = [n for n in names if params[n].dtype == dtype]
            xp = get_array_module(params[group[0]])
            size = sum(params[n].size for n in group)
            flat_p, flat_m, flat_v = xp.empty(size, dtype), xp.zeros(size, dtype), xp.zeros(size, dtype)
            offset = 0
            for n in group:  # one tensor at a time: each old array is freed once copied
                shape, end = params[n].shape, offset + params[n].size
                keep_moments = n in self._loaded or params[n] is self._handed.get(n)
                for flat, arrays in ((flat_p, params), (flat_m, self.m), (flat_v, self.v)):
                    view = flat[offset:end].reshape(shape)
                    if n in arrays and (arrays is params or keep_moments):
                        view[...] = arrays[n]
                    arrays[n] = view
                self._views[n] = self._handed[n] = params[n]
                offset = end
            self._groups.append((group, flat_p, flat_m, flat_v))
        self._loaded = set()

    @property
    def lr(self):
        """The learning rate the next step will use."""
        return self.schedule(self.step_count + 1)

    def step(self, grads):
        """Apply one AdamW update to every parameter named in `grads` (in place).

        The gradients are copied into one flat buffer per dtype first, so the caller's
        arrays are never modified (clipping scales the copy). Returns the gradient norm
        before clipping (a 0-d array: no host sync on a GPU) when clipping is on, else None.
        Every gradient is checked (a known name, an array of its parameter's shape) before
        any parameter changes or the step is counted. Their values are not: a NaN or an
        infinity is applied as given. It usually comes with a non-finite loss, which the
        training loop checks (train.TrainingDiverged), so that no step pays for a pass
        over every gradient to look for one.
        """
        params = self.model.params
        unknown = [n for n in grads if n not in params]
        if unknown:
            raise KeyError(f"gradients for unknown parameters: {unknown[:5]}")
        _check_grad_shapes(grads, params)
        lora = getattr(self.model, "lora", None)
        if lora is not None and lora.merged and any(n in grads for n in lora.param_names):
            # merged weights hold W + s*A@B of the old A, B: unmerging after a step on A, B
            # would subtract the new product and leave W corrupted
            raise RuntimeError("LoRA adapters are merged into the weights: unmerge_lora(model) before "
                               "an optimizer step on them")
        lr = _check_lr(self.schedule(self.step_count + 1))
        if not grads:  # else a step that changes nothing, yet counts (the schedule and bias corrections move on)
            raise OptimizerError("AdamW.step: no gradients (an empty dict): nothing to update, and no step "
                                 "was counted; pass what model.backward returns")
        if not self._packed(grads):
            self._pack(list(grads))
        flat_grads = []  # the gradients side by side, in the order of the parameter buffers
        for names, p, _, _ in self._groups:
            g = get_array_module(p).concatenate([grads[n].reshape(-1) for n in names])
            flat_grads.append(g.astype(p.dtype, copy=False))
        norm = None
        if self.max_grad_norm and flat_grads:  # torch.nn.utils.clip_grad_norm_ on the global norm, as clip_grad_norm
            xp = get_array_module(flat_grads[0])
            norm = xp.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in flat_grads))
            coef = xp.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
            for g in flat_grads:
                g *= coef.astype(g.dtype)
        self.step_count += 1
        t = self.step_count
        self.last_lr = lr
        b1, b2 = self.betas
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for (_, p, m, v), g in zip(self._groups, flat_grads):  # one group per dtype: usually one
            chunk = p.size if get_array_module(p) is not np else CPU_CHUNK
            for i in range(0, p.size, chunk):
                _adamw_update(p[i:i + chunk], m[i:i + chunk], v[i:i + chunk], g[i:i + chunk],
                              lr * self.weight_decay, b1, b2, step_size, bc2_sqrt, self.eps)
        return norm

    def state_dict(self):
        """Everything needed to resume exactly: step count, hyperparameters, moments
        (as NumPy arrays, copies: later steps do not change them)."""
        return {"step": self.step_count, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                "m": {n: np.array(to_numpy(a)) for n, a in self.m.items()},
                "v": {n: np.array(to_numpy(a)) for n, a in self.v.items()}}

    def load_state_dict(self, state):
        """Restore a state_dict (moments moved to the model's device and dtype)."""
        params = self.model.params
        missing = [n for n in state["m"] if n not in params]
        if missing:
            raise KeyError(f"optimizer state for parameters the model lacks: {missing[:5]}")
        for n in state["m"]:
            for moment in ("m", "v"):
                a = state[moment].get(n)
                if a is None or tuple(np.shape(a)) != tuple(params[n].shape):
                    raise OptimizerError(f"optimizer state {moment} for {n} has shape {np.shape(a)}, "
                                         f"parameter has {params[n].shape}")
        self.step_count = int(state["step"])
        self.betas, self.eps = tuple(state["betas"]), state["eps"]
        self.weight_decay, self.max_grad_norm = state["weight_decay"], state["max_grad_norm"]
        device, dtype = self.model.device, self.model.dtype
        self.m = {n: to_device(a, device, dtype) for n, a in state["m"].items()}
        self.v = {n: to_device(a, device, dtype) for n, a in state["v"].items()}
        self._groups, self._views = [], {}  # the next step packs the loaded moments
        self._loaded = set(state["m"])
