"""The exercise checker names the real fault, each proved on a learner's file broken on
purpose: a finished backward waiting for another function still stubbed ("needs"), a
packed input judged by its parts (q, k, v), a constant factor named, a broken invariant
(rows that sum to zero), and an exception inside the learner's code as one line that
names the function, the shapes and the line. Each file is the exercise file, the solutions
file's backwards after it, then one function overridden."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minilora import cli, gradcheck
from test_exercises import SOLUTIONS  # the solutions file's backwards, to append to the exercise file

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "examples" / "exercises" / "layers.py"

# A learner's attention backward, written against the file's own dropout_backward (minilora's
# calls minilora's). DQK, DQ and DK are the lines the tests break.
ATTENTION = """
def attention_backward(dout, cache):
    q, k, v, att, att_d, drop_cache, scale, query_pos = cache
    B, NH, Tq, hs = q.shape
    T, C = k.shape[2], NH * hs
    dy = dout.reshape(B, Tq, NH, hs).transpose(0, 2, 1, 3)  # [B, NH, Tq, hs]
    datt_d = dy @ v.transpose(0, 1, 3, 2)  # [B, NH, Tq, T]
    dv = att_d.transpose(0, 1, 3, 2) @ dy  # [B, NH, T, hs]
    (datt,) = dropout_backward(datt_d, drop_cache)
    dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dqk = {DQK}
    dq = {DQ}
    dk = {DK}
    dqkv = np.zeros((B, T, 3, NH, hs))
    if query_pos is None:
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    else:
        dqkv[np.arange(B), query_pos, 0] = dq[:, :, 0]
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return (dqkv.reshape(B, T, 3 * C),)
"""
RIGHT = dict(DQK="scale * dpre", DQ="dqk @ k", DK="dqk.transpose(0, 1, 3, 2) @ q")

# A learner's LoRA linear backward, through the file's own linear_backward.
LORA = """
def lora_linear_backward(dout, cache):
    linear_cache, (x, A, B, xa, scale, _) = cache
    dx, _, _ = linear_backward(dout, linear_cache)
    d = dout.reshape(-1, B.shape[1])  # [N, out]
    dxa = scale * d @ B.T  # [N, r]
    dA = x.reshape(-1, A.shape[0]).T @ dxa
    dB = scale * xa.T @ d
    return dx + (dxa @ A.T).reshape(x.shape), dA, dB
"""

CROSS_ENTROPY_WITHOUT_MEAN = """
def cross_entropy_backward(dloss, cache):
    probs, targets = cache
    dlogits = probs.copy()
    dlogits[np.arange(len(targets)), targets] -= 1.0
    return (dloss * dlogits,)  # forgot: / N
"""

LAYERNORM = """
def layernorm_backward(dout, cache):
    x, w, mean, rstd = cache
    n = (x - mean) * rstd
    dn = dout * w
    dx = rstd * ({DX})
    C = x.shape[-1]
    return dx, (dout * n).reshape(-1, C).sum(0), dout.reshape(-1, C).sum(0)
"""
LAYERNORM_RIGHT = "dn - dn.mean(axis=-1, keepdims=True) - n * (dn * n).mean(axis=-1, keepdims=True)"


def stub(name, message=True):
    return f"\ndef {name}(dout, cache):\n    raise NotImplementedError{f'({name!r})' if message else ''}\n"


def learner_file(tmp_path, *overrides):
    path = tmp_path / "layers.py"
    path.write_text(EXERCISES.read_text() + SOLUTIONS + "".join(overrides))
    return path


def attention(**lines):
    return ATTENTION.format(**{**RIGHT, **lines})


def check(path, *only):
    """The checker's results on the learner's file, by check name (what --json reports)."""
    module = gradcheck.load_layers(path)
    return {r.name: r for r in gradcheck.run_gradchecks(only=list(only) or None, fns=module)}


ATTENTION_CHECKS = ["attention", "attention_dropout", "attention_one_query"]


@pytest.fixture
def right_attention_and_lora(tmp_path):
    return learner_file(tmp_path, attention(), LORA)


def test_the_learner_style_solutions_pass(right_attention_and_lora):
    """The base the tests below break: the learner-style attention and LoRA backwards pass."""
    results = check(right_attention_and_lora, "attention", "lora_linear")
    assert list(results) == ATTENTION_CHECKS + ["lora_linear"]
    for r in results.values():
        assert r.status == "passed" and r.hint is None and not r.violations, (r.name, r.errors)


# ------------------------------------------------------------------------------ needs


@pytest.mark.parametrize("message", [True, False], ids=["named stub", "bare raise"])
def test_a_finished_backward_calling_a_stub_needs_that_stub(tmp_path, capsys, message):
    """The attention checks wait for dropout_backward, lora_linear for linear_backward; the
    stubs themselves stay "not implemented". A bare `raise NotImplementedError` is found
    from the traceback's innermost frame."""
    path = learner_file(tmp_path, attention(), LORA, stub("dropout_backward", message),
                        stub("linear_backward", message))
    status = cli.main(["gradcheck", "--module", str(path), "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert status == 1
    for name in ATTENTION_CHECKS:
        assert checks[name]["status"] == "needs" and checks[name]["needs"] == "dropout_backward", checks[name]
        assert not checks[name]["passed"] and checks[name]["max_rel_error"] is None  # the schema keeps its keys
    assert checks["lora_linear"]["status"] == "needs" and checks["lora_linear"]["needs"] == "linear_backward"
    assert checks["dropout"]["status"] == checks["linear"]["status"] == "not implemented"
    assert checks["gelu"]["status"] == "passed"

    assert cli.main(["gradcheck", "--module", str(path), "--only", "attention,lora_linear"]) == 1
    out = capsys.readouterr().out
    assert "attention, attention_dropout, attention_one_query: need dropout_backward" in out
    assert "lora_linear: needs linear_backward" in out and "not implemented" not in out


def test_a_function_the_file_does_not_define_is_not_implemented_for_its_own_check(tmp_path):
    path = tmp_path / "partial.py"
    path.write_text("from minilora.layers import dropout_forward\n")
    (r,) = check(path, "dropout").values()
    assert r.status == "not implemented" and r.needs is None


# ------------------------------------------------------------------------------ parts


def test_a_wrong_dk_shows_as_k_alone(tmp_path):
    """dk = dqk @ q, the transpose of dqk forgotten (the shapes still agree when Tq = T)."""
    results = check(learner_file(tmp_path, attention(DK="dqk @ q")), "attention")
    for name in ("attention", "attention_dropout"):
        r = results[name]
        assert set(r.errors) == {"q", "k", "v"}
        assert r.errors["k"] > 1e-2 and r.errors["q"] < 1e-9 and r.errors["v"] < 1e-9, r.errors
        assert r.worst["input"] == "k" and len(r.worst["index"]) == 3 and r.worst["index"][2] < 8  # within k's C
        assert r.hint is None  # a transpose is no constant factor


# ------------------------------------------------------------------------------ factors


def ratio_of(hint, part):
    """The analytic/numeric ratio the hint prints for `part`."""
    clause = next(c for c in hint.split("; ") if part in c.split(":")[0].split(", "))
    return float(clause.split("analytic/numeric = ")[1].split()[0])


def test_the_scale_left_out_is_named(tmp_path, capsys):
    """Without scale on dqk, dq and dk are sqrt(hs) = 2 times too large; dv is right."""
    path = learner_file(tmp_path, attention(DQK="dpre"))
    results = check(path, "attention")
    for r in results.values():
        assert r.status == "failed" and r.errors["v"] < 1e-9
        assert ratio_of(r.hint, "q") == ratio_of(r.hint, "k") == 2.0
        assert "q, k: analytic/numeric = 2 " in r.hint and "times sqrt(hs) = 2" in r.hint, r.hint
    assert cli.main(["gradcheck", "--module", str(path), "--only", "attention"]) == 1
    assert "hint: q, k: analytic/numeric = 2 on all" in capsys.readouterr().out


def test_the_mean_left_out_of_cross_entropy_is_named(tmp_path):
    (r,) = check(learner_file(tmp_path, CROSS_ENTROPY_WITHOUT_MEAN), "cross_entropy").values()
    assert r.status == "failed" and "times N (the rows of the mean) = 6" in r.hint, r.hint
    assert abs(ratio_of(r.hint, "logits") - 6.0) < 1e-6
    assert not r.violations  # its rows still sum to zero: only the scale is wrong


MASKED_OVER_N = """
def masked_cross_entropy_backward(dloss, cache):
    probs, targets, counted, M, shape = cache
    rows = np.nonzero(counted)[0]
    dlogits = np.zeros_like(probs)
    dlogits[rows] = probs[rows]
    dlogits[rows, targets[rows]] -= 1.0
    return (dloss * dlogits / len(targets),)  # wrong: / N, the ignored rows counted in the mean
"""
MASKED_IGNORED_ROWS_KEPT = """
def masked_cross_entropy_backward(dloss, cache):
    probs, targets, counted, M, shape = cache
    dlogits = probs.copy()  # wrong: the ignored rows keep their softmax
    rows = np.nonzero(counted)[0]
    dlogits[rows, targets[rows]] -= 1.0
    return (dloss * dlogits / M,)
"""


def test_the_masked_mean_over_all_rows_is_named(tmp_path):
    """Dividing by N = 6 instead of the M = 4 counted rows scales every entry by 4/6."""
    (r,) = check(learner_file(tmp_path, MASKED_OVER_N), "masked_cross_entropy").values()
    assert r.status == "failed" and "M/N (the mean over all N = 6 rows, not the M = 4 counted)" in r.hint, r.hint
    assert abs(ratio_of(r.hint, "logits") - 4 / 6) < 1e-6
    assert not r.violations  # the ignored rows are 0 and every row sums to 0: only the scale is wrong


def test_ignored_rows_with_a_gradient_break_the_zero_rows_invariant(tmp_path):
    """Ignored rows that keep softmax(z) still sum to 1, not 0, and are not 0: both invariants."""
    (r,) = check(learner_file(tmp_path, MASKED_IGNORED_ROWS_KEPT), "masked_cross_entropy").values()
    assert r.status == "failed"
    assert any(v.startswith("dlogits must be exactly 0 in the ignored rows (an ignored row has no term in "
                            "the loss); yours is not in 2 of 2: row 1") for v in r.violations), r.violations
    assert any(v.startswith("each row of dlogits must sum to zero") for v in r.violations), r.violations

def test_the_constant_ratio_is_constant_to_far_below_its_tolerance(tmp_path):
    """The measured spread of analytic/numeric over the compared entries, for the two
    constant-factor faults above: finite-difference noise only, far below RATIO_SPREAD."""
    module = gradcheck.load_layers(learner_file(tmp_path, attention(DQK="dpre"), CROSS_ENTROPY_WITHOUT_MEAN))
    spreads = {}
    for c in gradcheck.select(gradcheck.layer_checks(np, fns=module), ["attention", "cross_entropy"]):
        name, forward, backward, inputs, wrt = c.run.args
        (x,) = wrt
        out, cache = forward(**inputs)
        G = np.random.default_rng(0).standard_normal(np.shape(out))  # check_layer's G for seed 0
        a = backward(G, cache)[0]
        n = gradcheck.numerical_gradient(lambda: float((forward(**inputs)[0] * G).sum()), inputs[x])
        blocks = {"q": np.s_[..., :8], "k": np.s_[..., 8:16]} if x == "qkv" else {x: np.s_[...]}
        for part, cols in blocks.items():
            big = np.abs(n[cols]) >= gradcheck.RATIO_FLOOR * np.abs(n[cols]).max()
            ratios = a[cols][big] / n[cols][big]
            spreads[f"{name}.{part}"] = np.abs(ratios / np.median(ratios) - 1).max()
    # the bound beside gradcheck.RATIO_SPREAD: 7.5e-5 at the very worst; measured: at most 4.3e-8
    assert len(spreads) == 7 and max(spreads.values()) < 7.5e-5, spreads


# ------------------------------------------------------------------------------ invariants


def test_a_layernorm_dx_whose_rows_do_not_sum_to_zero_is_named(tmp_path, capsys):
    """Dropping mean(dn) breaks the row sums (sum_c dx = rstd * sum_c dn); the right dx
    keeps them; dropping the n * mean(dn n) term keeps them too (sum_c n_c = 0), so that
    fault is failed by the finite differences alone, with no invariant line."""
    without_mean = LAYERNORM.format(DX="dn - n * (dn * n).mean(axis=-1, keepdims=True)")
    (r,) = check(learner_file(tmp_path, without_mean), "layernorm").values()
    assert r.status == "failed" and len(r.violations) == 1
    assert r.violations[0].startswith("each row of dx must sum to zero (the output does not change when a "
                                      "constant is added to a row of x"), r.violations
    assert "yours does not in 10 of 10 rows" in r.violations[0]
    assert cli.main(["gradcheck", "--module", str(tmp_path / "layers.py"), "--only", "layernorm"]) == 1
    assert "  violated: each row of dx must sum to zero" in capsys.readouterr().out

    (r,) = check(learner_file(tmp_path, LAYERNORM.format(DX=LAYERNORM_RIGHT)), "layernorm").values()
    assert r.passed and r.violations == [] and r.hint is None
    without_n_term = LAYERNORM.format(DX="dn - dn.mean(axis=-1, keepdims=True)")
    (r,) = check(learner_file(tmp_path, without_n_term), "layernorm").values()
    assert r.status == "failed" and r.violations == []


def test_an_invariant_alone_fails_a_check():
    """A gradient right to 1e-9 (so within the finite-difference tolerance) whose rows
    sum to 1e-9, far above the rounding a C-term sum allows, is failed by the invariant."""
    violation = gradcheck.rows_sum_to_zero("x", "dx", "why")
    g = np.random.default_rng(0).standard_normal((3, 8))
    g -= g.mean(axis=-1, keepdims=True)  # rows sum to zero up to rounding
    assert violation({"x": g}) is None
    g[1, 2] += 1e-9
    line = violation({"x": g})
    assert line.startswith("each row of dx must sum to zero (why); yours does not in 1 of 3 rows: row [1]")


# ------------------------------------------------------------------------------ exceptions


def test_an_exception_in_the_learners_code_is_one_line(tmp_path):
    """The one-query dk with the transpose forgotten is a matmul of (1, T) by (1, hs):
    NumPy's gufunc error becomes one line with the function, the shapes, file:line and
    the source line; the other attention checks still report (k alone is wrong)."""
    path = learner_file(tmp_path, attention(DK="dqk @ q"))
    line_no = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "dk = dqk @ q" in text)
    results = check(path, "attention")
    problem = results["attention_one_query"].problem
    assert problem.startswith("attention_backward(dout (2, 8), cache [(2, 2, 1, 4), (2, 2, 5, 4), (2, 2, 5, 4), "
                              "(2, 2, 1, 5), (2, 2, 1, 5), (2, 2, 1, 5), 0.5, (2,)]) raised ValueError at "
                              f'layers.py:{line_no} "dk = dqk @ q": matmul: '), problem
    assert "\n" not in problem
    assert results["attention"].status == results["attention_dropout"].status == "failed"

    out = subprocess.run([sys.executable, "-m", "minilora", "gradcheck", "--module", str(path),
                          "--only", "attention_one_query"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert f"attention_one_query: {problem}" in out.stdout.splitlines()


def test_an_exception_in_a_helper_names_the_helper(tmp_path):
    """A layer that raises inside another function of the file: that function and its line."""
    helper = ("\ndef gelu_backward(dout, cache):\n    return (slope(*cache) * dout,)\n"
              "\ndef slope(x, t):\n    return x[None, :, 99]  # an index out of range\n")
    (r,) = check(learner_file(tmp_path, helper), "gelu").values()
    assert r.problem.startswith("gelu_backward(dout (2, 5, 7), cache [(2, 5, 7), (2, 5, 7)]) raised IndexError "
                                'in slope at layers.py:'), r.problem
    assert '"return x[None, :, 99]  # an index out of range": index 99 is out of bounds' in r.problem


def test_a_backward_that_returns_an_array_not_a_tuple_is_told_so(tmp_path):
    text = "\ndef gelu_backward(dout, cache):\n    x, t = cache\n    return dout * 0.5 * (1 + t)\n"
    (r,) = check(learner_file(tmp_path, text), "gelu").values()
    assert r.problem == ("ValueError: gelu_backward returned ndarray; expected a tuple of 1 gradient in the "
                         "order of the forward's inputs (one array: return (dx,))")


def test_a_backward_with_the_wrong_signature_is_one_line(tmp_path):
    text = "\ndef gelu_backward(dout):\n    return (dout,)\n"
    (r,) = check(learner_file(tmp_path, text), "gelu").values()
    assert r.problem == ("gelu_backward(arg0 (2, 5, 7), arg1 [(2, 5, 7), (2, 5, 7)]) raised TypeError when called: "
                         "gelu_backward() takes 1 positional argument but 2 were given"), r.problem
