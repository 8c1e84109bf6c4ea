"""The model-level exercises (examples/exercises/model.py, adamw.py) and their checks
(minilora/exercise_checks.py): the stubs as shipped are not implemented, the solutions
pass, and a solution broken on purpose in one place is reported at exactly that place,
with the diagnosis of the mistake made. The layer solutions pass every layer check and
keep the exercise file's forwards."""

import inspect
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from minilora import exercise_checks as ec
from minilora import gradcheck, reference

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "examples" / "exercises"
SOLUTIONS = EXERCISES / "solutions"
MODEL_CHECKS = ["model_lora_linear", "model_tied_head", "model_backward", "model_backward_lora",
                "model_backward_class"]


def run(module):
    return {r.name: r for r in map(gradcheck.run_check, ec.model_exercise_checks(module))}


def broken(tmp_path, name, old, new):
    """The solution file `name` with the one occurrence of `old` replaced by `new`, loaded."""
    text = (SOLUTIONS / name).read_text()
    assert text.count(old) == 1, old  # the mistake is made in exactly one place
    path = tmp_path / f"broken_{name}"
    path.write_text(text.replace(old, new))
    return gradcheck.load_layers(path)


def hint(result):
    return getattr(result, "hint", None)  # a CheckResult from run_check's except branches has none


def test_the_stubs_as_shipped_are_not_implemented():
    model = run(gradcheck.load_layers(EXERCISES / "model.py"))
    assert list(model) == MODEL_CHECKS  # the model checks only: the file attempts no AdamW
    adamw = run(gradcheck.load_layers(EXERCISES / "adamw.py"))
    assert list(adamw) == ["adamw"]
    for r in [*model.values(), *adamw.values()]:
        assert r.status == "not implemented" and not r.passed, r


def test_the_solutions_pass():
    results = {**run(gradcheck.load_layers(SOLUTIONS / "model.py")),
               **run(gradcheck.load_layers(SOLUTIONS / "adamw.py"))}
    assert list(results) == MODEL_CHECKS + ["adamw"]
    for r in results.values():
        assert r.passed and r.max_rel_error < r.tol and hint(r) is None, r


def test_the_activation_order_is_the_order_the_reference_backward_computes():
    """The order the check reads the activations in, the loss down to the embedding, is
    reference.backward's own (which fills dacts as it goes), and covers every activation."""
    params, s = ec.random_params()
    logits, acts = reference.forward(params, ec.IDX, 2, s)
    _, dacts = reference.backward(np.ones_like(logits), params, acts, 2, s)
    assert ec.activation_order(2) == list(dacts)
    assert ec.activation_order(2)[0] == "ln_f" and ec.activation_order(2)[-1] == "embedding"


FAN_IN = 'dx = dacts[h + "x_mid"] = dx + dm'


@pytest.mark.parametrize("new, where, diagnosis", [
    # the branch dropped at block 1's x_mid: the top block, the first fork met going backward
    ('dx = dacts[h + "x_mid"] = dx if i == 1 else dx + dm', "h.1.x_mid", "residual fan-in missing its branch"),
    # the skip dropped at block 0's x_mid only: block 1 stays right, so block 0 is named
    ('dx = dacts[h + "x_mid"] = dm if i == 0 else dx + dm', "h.0.x_mid", "residual fan-in missing the skip path"),
])
def test_a_missing_residual_fan_in_is_named_at_its_activation(tmp_path, new, where, diagnosis):
    results = run(broken(tmp_path, "model.py", FAN_IN, new))
    assert results["model_lora_linear"].passed and results["model_tied_head"].passed  # not the pieces
    order = ec.activation_order(2)
    for name in ("model_backward", "model_backward_lora", "model_backward_class"):
        r = results[name]
        assert r.status == "failed" and r.worst["input"] == where, (name, r.worst)
        assert hint(r).startswith(f"{where}: {diagnosis}"), hint(r)
        above = order[: order.index(where)]  # every gradient before it, going backward, is right
        assert all(r.errors[a] < r.tol for a in above) and r.errors[where] > 1e-2, r.errors


def test_a_tied_head_missing_its_share_of_dwte_is_named(tmp_path):
    results = run(broken(tmp_path, "model.py", 'grads["wte.weight"] = grads["wte.weight"] + dwte_head',
                         'grads["wte.weight"] = grads["wte.weight"]'))
    assert results["model_backward_class"].passed  # a classifier has no tied head
    for name in ("model_backward", "model_backward_lora"):
        r = results[name]
        assert r.worst["input"] == "wte.weight", r.worst
        assert hint(r).startswith("wte.weight: missing the tied head's contribution"), hint(r)
        wrong = [k for k, e in r.errors.items() if not e < r.tol]
        assert wrong == ["wte.weight"]  # every activation and every other parameter is right


def test_a_transposed_tied_head_gradient_is_named(tmp_path):
    r = run(broken(tmp_path, "model.py", 'np.einsum("btv,btc->vc", dlogits, x)',
                   'np.einsum("btv,btc->cv", dlogits, x)'))["model_tied_head"]
    assert r.status == "failed" and r.problem == "dwte: has shape (8, 11), expected (11, 8)"
    assert "transposed" in hint(r)


def test_a_lora_linear_without_its_adapter_path_into_x_is_named(tmp_path):
    results = run(broken(tmp_path, "model.py", "dx = dx + g @ A.T", "dx = dx"))
    r = results["model_lora_linear"]
    assert r.worst["input"] == "h.0.attn.c_attn: dx"  # the first linear checked, c_attn's three adapters
    assert hint(r).startswith("h.0.attn.c_attn: dx misses the adapters' path"), hint(r)
    assert results["model_backward"].passed  # no adapters there: the same mistake cannot show
    r = results["model_backward_lora"]  # the first linear with an adapter going backward
    assert r.worst["input"] == "h.1.mlp.gelu" and "h.1.mlp.c_proj" in hint(r), hint(r)


def test_a_skipped_layer_is_not_taken_for_a_fan_in(tmp_path):
    r = run(broken(tmp_path, "model.py", 'ref.gelu_backward(dm, acts[h + "mlp.c_fc"])', "dm"))["model_backward"]
    assert r.worst["input"] == "h.1.mlp.c_fc"
    assert hint(r) == "h.1.mlp.c_fc: yours equals the gradient of h.1.mlp.gelu: the step between them was skipped"


@pytest.mark.parametrize("old, new, diagnosis", [
    ("m_hat = m / (1.0 - b1**t)\n    v_hat = v / (1.0 - b2**t)", "m_hat = m\n    v_hat = v", "no bias correction:"),
    ("param = param * (1.0 - lr * weight_decay)\n", "grad = grad + weight_decay * param\n",
     "L2 decay instead of decoupled"),
    ("(np.sqrt(v_hat) + eps)", "np.sqrt(v_hat + eps)", "eps inside the square root"),
])
def test_the_usual_adamw_mistakes_are_diagnosed(tmp_path, old, new, diagnosis):
    r = run(broken(tmp_path, "adamw.py", old, new))["adamw"]
    assert r.status == "failed" and r.worst["input"].startswith("step 1:"), r.worst  # wrong from the start
    assert hint(r).startswith(f"adamw: {diagnosis}"), hint(r)


def test_each_adamw_mistake_fails_and_is_told_apart_from_the_others():
    """Every variant the diagnosis knows differs from ml.AdamW on the check's gradients by
    far more than the tolerance, and is diagnosed as itself, not as another; the variant
    function with no mistake passes (so the diagnoses are measured from a right base)."""
    assert run(types.SimpleNamespace(adamw_step=ec.adamw_variant))["adamw"].passed
    for mistake, variant in ec.ADAMW_MISTAKES:
        r = run(types.SimpleNamespace(adamw_step=partial(ec.adamw_variant, **variant)))["adamw"]
        assert r.status == "failed" and r.max_rel_error > 1e3 * r.tol, (mistake, r.max_rel_error)
        assert hint(r) == f"adamw: {mistake}"


def test_the_layer_solutions_pass_every_layer_check():
    results = gradcheck.run_gradchecks(fns=gradcheck.load_layers(SOLUTIONS / "layers.py"))
    assert len(results) == 11
    assert all(r.passed for r in results), gradcheck.format_table(results)


def test_a_broken_layer_solution_fails_alone(tmp_path):
    """The layer checks do tell the solutions' backwards apart from wrong ones: the
    layernorm without its term through rstd fails, and nothing else does."""
    module = broken(tmp_path, "layers.py", " - n * (dn * n).mean(axis=-1, keepdims=True))", ")")
    results = gradcheck.run_gradchecks(fns=module)
    assert [r.name for r in results if not r.passed] == ["layernorm"]
    assert next(r for r in results if r.name == "layernorm").errors["x"] > 1e-3


def test_the_layer_solutions_keep_the_exercise_forwards():
    """The solutions answer the exercise as it stands: the same forwards (and caches), the
    same GELU constant, the same backward names."""
    exercise = gradcheck.load_layers(EXERCISES / "layers.py")
    solution = gradcheck.load_layers(SOLUTIONS / "layers.py")
    for name in gradcheck.LAYER_FUNCTIONS:
        assert callable(getattr(solution, name)), name
        if name.endswith("_forward"):
            assert inspect.getsource(getattr(solution, name)) == inspect.getsource(getattr(exercise, name)), name
    assert solution.GELU_K == exercise.GELU_K


def test_the_model_files_define_no_layer_functions():
    """model.py calls the layers as ref.NAME: a name of a layer function in its namespace
    would be taken by the layer checks for the learner's own layer."""
    for path in (EXERCISES / "model.py", SOLUTIONS / "model.py"):
        module = gradcheck.load_layers(path)
        assert not [n for n in gradcheck.LAYER_FUNCTIONS if hasattr(module, n)], path
