"""A missing optional dependency skips the tests that need it, never a whole file.

tests/test_formats.py once skipped every test, INT formats included, when bitsandbytes was not
installed. Here it runs with an importable-but-broken ``bitsandbytes`` shadowing the real one: the
INT tests must pass and only the bitsandbytes comparisons skip.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_formats_file_runs_without_bitsandbytes(tmp_path):
    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError('bitsandbytes hidden by tests/test_no_hidden_skips.py', name='bitsandbytes')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_formats.py",
         "-k", "test_int_error_within_half_a_step or test_nf4_without_double_quant"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert " passed" in out and " skipped" in out, out[-3000:]
    assert "bitsandbytes hidden" in out, out[-3000:]  # the skip reason is the missing import, per test
