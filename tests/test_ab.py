"""The checkout A/B benchmark (bench/ab.py) run small, so the tool cannot rot: both sides
answer every turn from their own checkout, and neither process outlives the run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def test_a_checkout_against_itself_prints_both_sides_and_a_verdict() -> None:
    """``python bench/ab.py ROOT ROOT`` prints a line per side with the calls it timed and the
    per-turn verdict over every turn, and exits 0."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ab.py"), ROOT, ROOT,
                          "--turns", "4", "--batch", "5", "--warmup", "5", "--items", "3"],
                         capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("A p50 ") and lines[0].endswith("(20 calls)"), lines
    assert lines[1].startswith("B p50 ") and lines[1].endswith("(20 calls)"), lines
    assert lines[2].startswith("B-A per turn: median ") and lines[2].endswith(" of 4 turns")


def test_a_side_that_cannot_start_fails_the_run(tmp_path) -> None:
    """A directory with no Achilles in it: the run stops with an error naming the side
    instead of waiting for it."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ab.py"), ROOT,
                          str(tmp_path), "--turns", "2", "--batch", "2", "--warmup", "1"],
                         capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert out.returncode != 0
    assert "side B" in out.stderr and str(tmp_path) in out.stderr
