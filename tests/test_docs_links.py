"""Every link into docs/derivations.md names a section that exists, and every backward
of the fast layers links to its derivation."""

import inspect
import re
from pathlib import Path

from minilora import layers, lora, reference

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "derivations.md"


def github_anchor(heading):
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors():
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", DOC.read_text(), re.M)}


def test_github_anchor_rule():
    assert github_anchor("Checking it: finite differences") == "checking-it-finite-differences"
    assert github_anchor("Cross-entropy") == "cross-entropy"


def test_every_link_into_the_derivations_names_a_section():
    files = [*ROOT.glob("minilora/*.py"), *ROOT.glob("examples/**/*.py"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md")]
    links = {(f.name, m) for f in files for m in re.findall(r"derivations\.md#([\w\-]+)", f.read_text())}
    assert len(links) >= 10
    missing = sorted((f, a) for f, a in links if a not in anchors())
    assert not missing, missing


def test_every_backward_links_its_derivation():
    for module in (layers, lora):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.endswith("_backward") and fn.__module__ == module.__name__:
                assert "docs/derivations.md#" in (fn.__doc__ or ""), f"{module.__name__}.{name}"
    for name, fn in inspect.getmembers(reference, inspect.isfunction):
        if name.endswith("_backward") and name != "backward":
            assert "docs/derivations.md#" in inspect.getsource(fn), f"reference.{name}"
