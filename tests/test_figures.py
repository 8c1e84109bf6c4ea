"""docs/figures/make_figures.py draws its figures from scratch (into tmp_path, in its fast
mode): both files appear, are well-formed SVG with the content the captions promise
(every node of layernorm's graph, every head's attention with the tokens on the axes),
and the committed copies are small."""

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
spec = importlib.util.spec_from_file_location("make_figures", FIGURES / "make_figures.py")
make_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_figures)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    make_figures.main(["--out", str(out), "--fast"])
    return out


def svg_text(path):
    root = ET.parse(path).getroot()  # well-formed XML, or this raises
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext())  # the text stays text (svg.fonttype none)


def test_layernorm_graph_has_every_forward_line_and_its_backward(drawn):
    text = svg_text(drawn / "layernorm_graph.svg")
    for line in ("mean = mean_C(x)", "xc = x - mean", "var = mean_C(xc²)", "rstd = 1/√(var + eps)",
                 "n = xc · rstd", "y = n · w + b"):
        assert line in text, line
    for _, _, backward, _ in make_figures.LN_EDGES:
        assert backward.split("\n")[0] in text, backward
    assert "dx = rstd · (dn - mean_C(dn) - n · mean_C(dn · n))" in text


def test_attention_figure_has_every_head_and_the_tokens(drawn):
    path = drawn / "attention_contains_7.svg"
    text = svg_text(path)
    assert all(f"layer {i}, head {h}" in text for i in range(2) for h in range(4))
    assert "Not pretrained GPT-2" in text and "key j" in text and "query t" in text
    assert path.read_bytes().count(b"<image") >= 8  # one heat map per head
    assert path.stat().st_size > 20_000


def test_attention_share_is_measured_on_the_target_tokens():
    """attention_on_target on a hand-made pattern: the last query puts 0.75 on the one 7 of the
    first sequence; the second sequence has no 7 and is left out."""
    import numpy as np

    att = np.zeros((1, 2, 1, 3, 3))  # [L, B, NH, T, T]
    att[0, 0, 0, 2] = [0.25, 0.75, 0.0]
    att[0, 1, 0, 2] = [0.0, 0.0, 1.0]
    idx = np.array([[3, 7, 1], [3, 4, 1]])
    assert make_figures.attention_on_target(att, idx).tolist() == [[0.75]]


def test_committed_figures_are_there_and_small():
    for name in ("layernorm_graph.svg", "attention_contains_7.svg"):
        size = (FIGURES / name).stat().st_size
        assert 5_000 < size < 200_000, (name, size)
