"""tools/mutants.py (``make mutants``) without running it: the catalogue still applies to this tree
(every ``old`` text occurs exactly once, so a refactor cannot silently turn a mutant into a no-op),
it covers the classes of bug it promises, and the working tree is never written."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import mutants  # noqa: E402
from mutants_catalogue import MUTANTS  # noqa: E402


def test_catalogue_applies_to_this_tree():
    assert mutants.check_catalogue(MUTANTS) == []
    assert len(MUTANTS) >= 15


def test_catalogue_covers_the_promised_classes():
    classes = {m["cls"] for m in MUTANTS}
    for c in ("multi-tile reduction", "nested index", "partial words", "multi-tile pooling", "scale/bias swap",
              "sign", "wrong group"):
        assert c in classes, c
    files = {m["file"] for m in MUTANTS}
    assert any(f.startswith("qlk/kernels/") for f in files) and "qlk/reference.py" in files
    assert any(f.startswith("qlk/formats/") for f in files)


def test_apply_requires_exactly_one_match():
    m = dict(id="x", file="f", old="a + b", new="a - b")
    assert mutants.apply("y = a + b", m) == "y = a - b"
    with pytest.raises(ValueError, match="0 times"):
        mutants.apply("y = a * b", m)
    with pytest.raises(ValueError, match="2 times"):
        mutants.apply("y = a + b; z = a + b", m)


def test_list_mode_runs_nothing_and_leaves_the_tree_alone(capsys):
    before = {m["file"]: open(os.path.join(ROOT, m["file"]), encoding="utf-8").read() for m in MUTANTS}
    assert mutants.main(["--list"]) == 0
    assert "splitk-one-tile-per-slice" in capsys.readouterr().out
    after = {f: open(os.path.join(ROOT, f), encoding="utf-8").read() for f in before}
    assert before == after
