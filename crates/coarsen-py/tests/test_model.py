"""An export of the `coarsen` command line, loaded and run from Python, against the NumPy
reference loader (examples/numpy_reference.py) on the same images."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import coarsen
from conftest import REPO


@pytest.fixture(scope="module")
def export(tmp_path_factory, cli):
    d = tmp_path_factory.mktemp("export")
    w, m = d / "w.safetensors", d / "m.safetensors"
    cli("synth", "--model", "resnet20", "--classes", "10", "--seed", "1", "--out", w)
    cli("prune", "-q", "--weights", w, "--sparsity", "0.7", "--include", r"conv.*weight|layer.*weight",
        "--out", d / "pruned.safetensors")
    cli("convert", "-q", "--weights", w, "--mask", d / "pruned.safetensors", "--to", "channel",
        "--out", m)
    cli("export", "-q", "--model", "resnet20", "--weights", w, "--mask", m, "--input", "3,32,32",
        "--out", d / "exp")
    return d / "exp"


def reference_logits(export, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [sys.executable, REPO / "examples" / "numpy_reference.py", export,
         "--input", tmp_path / "x.npy", "--logits-out", tmp_path / "ref.npy"],
        check=True, capture_output=True,
    )
    return np.load(tmp_path / "ref.npy").reshape(len(x), -1)


def test_predict_matches_numpy_reference(export, tmp_path):
    model = coarsen.load(export)
    assert model.input_shape == (3, 32, 32) and model.classes == 10
    assert "channel" in set(model.formats.values())
    assert [layer["name"] for layer in model.layers] == list(model.formats)
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32), dtype=np.float32)
    ref = reference_logits(export, x, tmp_path)
    logits = model.forward(x)
    assert logits.shape == (6, 10)
    np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(model.predict(x), ref.argmax(axis=1))
    assert model.predict(x).dtype == np.int64
    # The dense baseline path, one image, and a float64 batch agree.
    dense = coarsen.load(export, dense=True)
    assert set(dense.formats.values()) == {"dense"}
    np.testing.assert_allclose(dense.forward(x), ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(model.forward(x[0]), ref[:1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(model.forward(x.astype(np.float64)), ref, rtol=1e-3, atol=1e-3)


def test_model_refusals(export, tmp_path):
    model = coarsen.load(export)
    with pytest.raises(coarsen.CoarsenError, match=r"\(batch, 3, 32, 32\)"):
        model.predict(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(coarsen.CoarsenError, match="not finite"):
        model.predict(np.full((1, 3, 32, 32), np.nan, np.float32))
    with pytest.raises(FileNotFoundError):
        coarsen.load(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{}")
    with pytest.raises(coarsen.CoarsenError, match="model.json"):
        coarsen.load(tmp_path / "broken")


def test_tensors_of_another_export_are_refused(export, tmp_path, cli):
    """model.json records the checksum of model.safetensors: tensors beside the description of
    another export (an export killed between its two writes) do not load."""
    import shutil

    w = tmp_path / "w.safetensors"
    cli("synth", "--model", "resnet20", "--classes", "10", "--seed", "2", "--out", w)
    cli("export", "-q", "--model", "resnet20", "--weights", w, "--input", "3,32,32", "--out", tmp_path / "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(export, mixed)
    shutil.copy(tmp_path / "other" / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(coarsen.CoarsenError, match="not of one export"):
        coarsen.load(mixed)
    coarsen.load(export)  # the export itself still loads
