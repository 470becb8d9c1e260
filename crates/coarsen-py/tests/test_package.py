"""The package around the functions: `python -m coarsen`, the examples, the type stubs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import coarsen
from conftest import REPO, coarsen_binary

PY = Path(__file__).resolve().parents[1]


def test_python_m_coarsen_help_without_binary():
    env = {**os.environ, "PATH": "/nonexistent", "COARSEN_BIN": ""}
    out = subprocess.run([sys.executable, "-m", "coarsen", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    assert "coarsen.convert" in out.stdout and "cargo install" in out.stderr
    out = subprocess.run([sys.executable, "-m", "coarsen", "train"], capture_output=True, text=True, env=env)
    assert out.returncode == 2


def test_python_m_coarsen_runs_the_cli():
    binary = coarsen_binary()
    if binary is None:
        pytest.skip("no coarsen binary")
    out = subprocess.run([sys.executable, "-m", "coarsen", "convert", "--help"],
                         capture_output=True, text=True, env={**os.environ, "COARSEN_BIN": binary})
    assert out.returncode == 0, out.stderr
    assert "--to" in out.stdout


def test_numpy_example_runs(tmp_path):
    out = subprocess.run([sys.executable, REPO / "examples" / "numpy_convert.py", "--out", tmp_path],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "group" in out.stdout and (tmp_path / "group.safetensors").is_file()


def test_stubs_cover_the_api():
    stub = (PY / "python" / "coarsen" / "__init__.pyi").read_text()
    for name in coarsen.__all__:
        assert f"{name}" in stub, name
    for method in ("matmul", "t_matmul", "nbytes", "density", "format", "predict", "formats"):
        assert f"def {method}" in stub, method
    assert (PY / "python" / "coarsen" / "py.typed").exists()


def test_version_and_docs():
    assert coarsen.__version__
    for name in coarsen.__all__:
        assert getattr(coarsen, name).__doc__, name


def test_coarsen_pin_is_checked_at_import():
    # The engine's threads are pinned as COARSEN_PIN says; a value that is not auto, on or off
    # is refused when the module loads, naming the variable.
    code = "import coarsen"
    for value in ("auto", "on", "off"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "COARSEN_PIN": value})
        assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "COARSEN_PIN": "sometimes"})
    assert out.returncode != 0
    assert "COARSEN_PIN" in out.stderr and "auto, on or off" in out.stderr
