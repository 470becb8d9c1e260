"""Masks and conversions against the `coarsen` command line on the same files: byte-identical
masks, the same report, the same refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import coarsen
from conftest import read_safetensors, write_safetensors

# Every pattern with options that exercise it (small blocks for the small layers).
PATTERNS = [
    ("channel", {}, []),
    ("channel+", {"extra": 0.2}, ["--extra", "0.2"]),
    ("group", {"parts": 4}, ["--parts", "4"]),
    ("group", {"parts": "auto", "partitioner": "random"}, ["--parts", "auto", "--partitioner", "random"]),
    ("shuffled-block", {"block": 8}, ["--block", "8"]),
    ("shuffled-block", {"block": 8, "similarity": 0.3}, ["--block", "8", "--similarity", "0.3"]),
    ("block", {"block": (8, 4)}, ["--block", "8x4"]),
    ("nm", {}, []),
    ("nm", {"n": 1, "m": 4, "permute": True}, ["--n", "1", "--m", "4", "--permute"]),
    ("group", {"parts": "auto", "kernels": True}, ["--parts", "auto", "--kernels"]),
    ("shuffled-block", {"block": 4, "kernels": True}, ["--block", "4", "--kernels"]),
]


def test_prune_matches_cli_bytes(tmp_path, cli, layers):
    w = tmp_path / "w.safetensors"
    write_safetensors(w, layers)
    cli("prune", "-q", "--weights", w, "--sparsity", "0.8", "--out", tmp_path / "cli.safetensors")
    masks = coarsen.prune(layers, 0.8)
    coarsen.write_masks(tmp_path / "py.safetensors", masks)
    assert (tmp_path / "py.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    # Rank >= 2 only by default, like the CLI; the bias is not a layer.
    assert sorted(masks) == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert masks.density() == pytest.approx(0.2, abs=1e-3)
    # Per layer and further (IMP's next round), with a selection.
    cli("prune", "-q", "--weights", w, "--sparsity", "0.9", "--scope", "layer",
        "--mask", tmp_path / "cli.safetensors", "--exclude", "fc", "--out", tmp_path / "cli2.safetensors")
    again = coarsen.prune(layers, 0.9, scope="layer", mask=masks, exclude="fc")
    coarsen.write_masks(tmp_path / "py2.safetensors", again)
    assert (tmp_path / "py2.safetensors").read_bytes() == (tmp_path / "cli2.safetensors").read_bytes()


def test_prune_by_kernels_matches_cli_bytes(tmp_path, cli, layers):
    w = tmp_path / "w.safetensors"
    write_safetensors(w, layers)
    cli("prune", "-q", "--weights", w, "--sparsity", "0.7", "--granularity", "kernel",
        "--out", tmp_path / "cli.safetensors")
    masks = coarsen.prune(layers, 0.7, granularity="kernel")
    coarsen.write_masks(tmp_path / "py.safetensors", masks)
    assert (tmp_path / "py.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    conv = np.asarray(masks["conv2.weight"])
    per_kernel = conv.reshape(conv.shape[0], conv.shape[1], -1)
    assert (per_kernel.min(axis=2) == per_kernel.max(axis=2)).all(), "whole kernels"
    with pytest.raises(ValueError, match="granularity"):
        coarsen.prune(layers, 0.7, granularity="row")


@pytest.mark.parametrize("to,options,flags", PATTERNS, ids=[f"{p[0]}{p[2]}" for p in PATTERNS])
def test_convert_matches_cli_bytes(tmp_path, cli, layers, to, options, flags):
    w, m = tmp_path / "w.safetensors", tmp_path / "m.safetensors"
    write_safetensors(w, layers)
    masks = coarsen.prune(layers, 0.75)
    coarsen.write_masks(m, masks)
    out, report_file = tmp_path / "cli.safetensors", tmp_path / "cli.json"
    cli("convert", "-q", "--weights", w, "--mask", m, "--to", to, *flags, "--seed", "3",
        "--out", out, "--report", report_file)
    # The masks as read back from the file, and as arrays straight from NumPy.
    for given in (coarsen.read_masks(m), masks):
        converted, report = coarsen.convert(layers, given, to=to, seed=3, **options)
        coarsen.write_masks(tmp_path / "py.safetensors", converted)
        assert (tmp_path / "py.safetensors").read_bytes() == out.read_bytes()
    # The same report, timings aside.
    cli_report = json.loads(report_file.read_text())

    def untimed(r):
        r = json.loads(json.dumps(r))
        for key in ("time_ms",):
            r.pop(key, None)
            for layer in r.get("layers", []):
                layer.pop(key, None)
        r.get("total", {}).pop("time_ms", None)
        return r

    assert untimed(report) == untimed(cli_report)
    assert "total" in str(report)
    # Every structured layer has the structure its metadata names.
    coarsen.check(converted)
    ours, meta = read_safetensors(out)
    assert json.loads(meta["coarsen"]) == converted.metadata
    for name, mask in converted.items():
        assert mask.dtype == np.uint8 and mask.shape == layers[name].shape
        np.testing.assert_array_equal(mask, ours[name])


def test_target_density_matches_cli(tmp_path, cli, layers):
    w, m = tmp_path / "w.safetensors", tmp_path / "m.safetensors"
    write_safetensors(w, layers)
    masks = coarsen.prune(layers, 0.75)
    coarsen.write_masks(m, masks)
    for scope in ("layer", "global"):
        out = tmp_path / f"cli-{scope}.safetensors"
        cli("convert", "-q", "--weights", w, "--mask", m, "--to", "group", "--seed", "3",
            "--target-density", "0.3", "--target-scope", scope, "--out", out)
        converted, report = coarsen.convert(layers, masks, to="group", seed=3,
                                            target_density=0.3, target_scope=scope)
        coarsen.write_masks(tmp_path / "py.safetensors", converted)
        assert (tmp_path / "py.safetensors").read_bytes() == out.read_bytes()
        assert report["target"]["scope"] == scope
        coarsen.check(converted)
    with pytest.raises(coarsen.CoarsenError, match="target-density"):
        coarsen.convert(layers, masks, to="group", target_density=0.0)
    with pytest.raises(coarsen.CoarsenError, match="target_scope"):
        coarsen.convert(layers, masks, to="group", target_density=0.3, target_scope="all")


def test_inputs_as_bool_float_and_torch_like(layers):
    masks = coarsen.prune(layers, 0.5)
    as_bool = {k: v.astype(bool) for k, v in masks.items()}
    as_float = {k: v.astype(np.float64) for k, v in masks.items()}
    a, _ = coarsen.convert(layers, as_bool, to="channel")
    b, _ = coarsen.convert({k: v.astype(np.float64) for k, v in layers.items()}, as_float, to="channel")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])

    class Tensor:  # what coarsen needs of a torch.Tensor
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    c, _ = coarsen.convert({k: Tensor(v) for k, v in layers.items()},
                           {k: Tensor(v) for k, v in as_bool.items()}, to="channel")
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])


def test_check_names_the_violation(layers):
    masks = coarsen.prune(layers, 0.7)
    with pytest.raises(coarsen.CoarsenError, match=r"'conv1.weight' \[32, 16, 3, 3\] is not channel"):
        coarsen.check(masks["conv1.weight"], "channel", name="conv1.weight")
    channel, _ = coarsen.convert(layers, masks, to="channel")
    coarsen.check(channel["conv1.weight"], "channel")
    nm, _ = coarsen.convert(layers, masks, to="nm", permute=True)
    perm = nm.metadata["layers"]["conv2.weight"]["col_perm"]
    coarsen.check(nm["conv2.weight"], "nm", n=2, m=4, col_perm=perm)
    with pytest.raises(coarsen.CoarsenError, match="permutation"):
        coarsen.check(nm["conv2.weight"], "nm", col_perm=[0, 0, 1])
    with pytest.raises(coarsen.CoarsenError, match="distinct row patterns"):
        coarsen.check(masks["conv2.weight"], "group", parts=2)
    with pytest.raises(coarsen.CoarsenError, match="rank 2"):
        coarsen.check(np.ones(5, np.uint8), "channel")
    with pytest.raises(TypeError):
        coarsen.check(masks["fc.weight"])


def test_refusals_are_clear_exceptions(tmp_path, layers):
    masks = coarsen.prune(layers, 0.8)
    channel, _ = coarsen.convert(layers, masks, to="channel")
    ghost = json.loads(json.dumps(channel.metadata))
    ghost["layers"]["ghost"] = {"status": "structured"}
    nm, _ = coarsen.convert(layers, masks, to="nm", permute=True)
    bad_perm = json.loads(json.dumps(nm.metadata))
    bad_perm["layers"]["conv1.weight"]["col_perm"] = [0, 0, 1]
    cases = [
        (lambda: coarsen.prune(layers, 1.5), "sparsity"),
        (lambda: coarsen.prune(layers, 0.5, scope="row"), "scope"),
        (lambda: coarsen.prune(layers, 0.5, include="("), "regular expression"),
        (lambda: coarsen.prune(layers, 0.5, include="nothing"), "no layer selected"),
        (lambda: coarsen.convert(layers, masks, to="diagonal"), "to='diagonal'"),
        (lambda: coarsen.convert(layers, masks, to="channel", parts=4), "parts applies to group"),
        (lambda: coarsen.convert(layers, masks, to="group", parts=-1), "parts=-1"),
        (lambda: coarsen.convert(layers, masks, to="group", imbalance=float("nan")), "finite"),
        (lambda: coarsen.convert(layers, masks, to="shuffled-block", block=(8, 4)), "square"),
        (lambda: coarsen.convert(layers, masks, to="block", block=0), "at least 1"),
        (lambda: coarsen.convert(layers, masks, to="nm", n=5, m=4), "n"),
        (lambda: coarsen.convert(layers, masks, to="channel", criterion="best"), "criterion"),
        (lambda: coarsen.convert(layers, {"fc.weight": masks["fc.weight"][:5]}, to="channel"),
         r"fc.weight.*\[5, 64\].*\[10, 64\]"),
        (lambda: coarsen.convert({}, masks, to="channel"), "has no tensor 'conv1.weight'"),
        (lambda: coarsen.convert({**layers, "fc.weight": np.full((10, 64), np.nan, np.float32)},
                                 masks, to="channel"), "fc.weight"),
        (lambda: coarsen.convert(layers, {"fc.weight": np.full((10, 64), 2.0)}, to="channel"), "0 and 1"),
        (lambda: coarsen.convert(layers, {"fc.weight": np.zeros((10, 64), bool)}, to="channel"), "zero"),
        (lambda: coarsen.convert(layers, {"fc.weight": np.array(["a"])}, to="channel"), "not a mask"),
        (lambda: coarsen.write_masks(tmp_path / "x.safetensors", coarsen.Masks(channel, ghost)), "ghost"),
        (lambda: coarsen.write_masks(tmp_path / "x.safetensors", coarsen.Masks(nm, bad_perm)),
         r"conv1.weight.*col_perm is not a permutation"),
        (lambda: coarsen.write_masks(tmp_path / "x.safetensors", coarsen.Masks(masks, {"pattern": 3})),
         "metadata"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="unexpected option 'bogus'|unexpected option \"bogus\""):
        coarsen.convert(layers, masks, to="channel", bogus=1)
    with pytest.raises(FileNotFoundError):
        coarsen.read_masks(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(coarsen.CoarsenError, match="bad.safetensors"):
        coarsen.read_masks(tmp_path / "bad.safetensors")
    assert not list(tmp_path.glob(".coarsen-*"))


def test_scores_criterion(layers):
    masks = coarsen.prune(layers, 0.5)
    scores = {k: np.arange(v.shape[0], dtype=np.float32) for k, v in layers.items() if v.ndim >= 2}
    out, report = coarsen.convert(layers, masks, to="channel", scores=scores)
    assert out.metadata["params"]["criterion"] == "scores"
    # The highest-scored rows are the ones kept.
    kept = np.flatnonzero(out["fc.weight"].any(axis=1))
    assert list(kept) == list(range(10 - len(kept), 10))
    with pytest.raises(coarsen.CoarsenError, match="scores"):
        coarsen.convert(layers, masks, to="channel", scores={"fc.weight": np.ones(3, np.float32)})
