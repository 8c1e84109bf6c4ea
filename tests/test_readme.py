"""The README's "Start here" works as a learner would use it: its files exist and its
Python snippet runs offline, printing what its comments say."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def start_here():
    return README[README.index("## Start here"):README.index("## Two commands")]


def test_start_here_links_point_at_files():
    links = re.findall(r"\]\(([^)#]+)\)", start_here())
    assert len(links) >= 6
    for link in links:
        assert (ROOT / link).exists(), link  # a file, or a folder (GitHub lists it)


def run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_start_here_snippets_run_and_print_what_they_say():
    reference_snippet, training_snippet = re.findall(r"```python\n(.*?)```", start_here(), re.S)
    assert run(reference_snippet)[:2] == ["(2, 5, 8) (8, 32)", "True"]
    losses = [float(line.split()[-1]) for line in run(training_snippet)]
    assert len(losses) == 6 and losses[-1] < 0.1 * losses[0]  # the loss falls
