"""Packed matrices against the NumPy reference `(W * mask) @ x`, for every format."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import coarsen


def structured(layers, to, **options):
    w = layers["conv2.weight"]
    masks = coarsen.prune({"w": w}, 0.75)
    out, _ = coarsen.convert({"w": w}, masks, to=to, **options)
    return w, out["w"]


# (format, pattern, pack options, convert options)
FORMATS = [
    ("dense", None, {}, {}),
    ("csr", None, {}, {}),
    ("channel", "channel", {}, {}),
    ("group", "group", {}, {"parts": 4, "row_tile": 4}),
    ("shuffled-block", "shuffled-block", {"block": 8}, {"block": 8}),
    ("bsr", "block", {"block": (8, 4)}, {"block": (8, 4)}),
    ("nm", "nm", {"n": 2, "m": 4}, {}),
]


@pytest.mark.parametrize("fmt,pattern,pack_options,options", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_matches_the_reference(layers, fmt, pattern, pack_options, options):
    rng = np.random.default_rng(1)
    if pattern is None:
        w = layers["conv2.weight"]
        mask = coarsen.prune({"w": w}, 0.9)["w"]
    else:
        w, mask = structured(layers, pattern, **options)
    p = coarsen.pack(w, mask, fmt, **pack_options)
    assert p.format == fmt
    rows, cols = p.shape
    assert (rows, cols) == (64, 32 * 9) and p.weight_shape == [64, 32, 3, 3]
    assert p.nnz == int(mask.sum()) and p.density == pytest.approx(mask.mean())
    assert 0 < p.nbytes
    ref = (w * mask).reshape(rows, cols).astype(np.float64)
    for n in (1, 7, 64):
        x = rng.standard_normal((cols, n), dtype=np.float32)
        np.testing.assert_allclose(p.matmul(x), ref @ x, rtol=1e-4, atol=1e-4)
        dy = rng.standard_normal((rows, n), dtype=np.float32)
        np.testing.assert_allclose(p.t_matmul(dy), ref.T @ dy, rtol=1e-4, atol=1e-4)
    # A vector, a float64 operand and a transposed (non-contiguous) view give the same.
    x = rng.standard_normal((cols, 5), dtype=np.float32)
    np.testing.assert_allclose(p.matmul(x[:, 0]), ref @ x[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p.matmul(x.astype(np.float64)), ref @ x, rtol=1e-4, atol=1e-4)
    xt = np.ascontiguousarray(x.T).T
    assert not xt.flags.c_contiguous
    np.testing.assert_allclose(p.matmul(xt), ref @ x, rtol=1e-4, atol=1e-4)


def test_auto_format_and_out(layers):
    w, mask = structured(layers, "channel")
    p = coarsen.pack(w, mask)
    assert p.format == "channel"
    assert coarsen.pack(w).format == "dense"  # no zeros: dense
    x = np.random.default_rng(2).standard_normal((p.shape[1], 16), dtype=np.float32)
    out = np.full((p.shape[0], 16), np.nan, np.float32)
    got = p.matmul(x, out=out)
    assert got is out  # written in place, no new array
    np.testing.assert_allclose(out, (w * mask).reshape(64, -1) @ x, rtol=1e-4, atol=1e-4)
    # The kept rows alone, as the channel kernel computes them.
    kept = p.kept_rows
    assert kept == sorted(kept) and len(kept) < 64
    np.testing.assert_array_equal(p.matmul(x, compact=True), out[kept])
    small = np.empty((len(kept), 16), np.float32)
    assert p.matmul(x, out=small, compact=True) is small
    np.testing.assert_array_equal(small, out[kept])
    assert coarsen.pack(w).kept_rows is None
    with pytest.raises(coarsen.CoarsenError, match="out has shape"):
        p.matmul(x, out=np.zeros((3, 16), np.float32))
    with pytest.raises(coarsen.CoarsenError, match="out"):
        p.matmul(x, out=np.zeros((64, 16), np.float64))


def test_no_copy_where_a_view_serves():
    from coarsen import _float32, _mask

    a = np.ones((4, 4), np.float32)
    assert _float32(a, "a") is a
    b = np.ones((4, 4), bool)
    assert np.shares_memory(_mask(b, "b"), b)
    u = np.ones((4, 4), np.uint8)
    assert _mask(u, "u") is u
    # Results own their memory (handed over from Rust, not copied into a new buffer twice).
    masks = coarsen.prune({"w": np.arange(16, dtype=np.float32).reshape(4, 4) + 1}, 0.5)
    assert masks["w"].base is not None or masks["w"].flags.owndata


def test_refusals(layers):
    w = layers["conv2.weight"]
    mask = coarsen.prune({"w": w}, 0.7)["w"]
    p = coarsen.pack(w, mask, "csr")
    with pytest.raises(coarsen.CoarsenError, match=r"\(288,\) or \(288, n\)"):
        p.matmul(np.ones((10, 3), np.float32))
    # NaN in an operand propagates as in NumPy (operands are not files).
    assert np.isnan(p.matmul(np.full((288, 2), np.nan, np.float32))).any()
    with pytest.raises(coarsen.CoarsenError, match="channel"):
        coarsen.pack(w, mask, "channel")  # not channel-sparse
    with pytest.raises(coarsen.CoarsenError, match="format='diag'"):
        coarsen.pack(w, mask, "diag")
    with pytest.raises(coarsen.CoarsenError, match="does not match"):
        coarsen.pack(w, mask[:3])
    with pytest.raises(coarsen.CoarsenError, match="rank 2"):
        coarsen.pack(np.ones(4, np.float32))
    with pytest.raises(coarsen.CoarsenError, match="not finite"):
        coarsen.pack(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(coarsen.CoarsenError, match="block= does not apply"):
        coarsen.pack(w, mask, "csr", block=4)
    with pytest.raises(coarsen.CoarsenError, match="square"):
        coarsen.pack(w, mask, "shuffled-block", block=(8, 4))


def test_releases_the_gil(layers):
    """While a product runs in one thread, Python code runs in another: it could not if the
    call held the GIL (the ticks inside the call's window would be missing)."""
    import time

    w, mask = structured(layers, "channel")
    p = coarsen.pack(np.tile(w, (8, 1, 1, 1)), np.tile(mask, (8, 1, 1, 1)))
    x = np.random.default_rng(3).standard_normal((p.shape[1], 4096), dtype=np.float32)
    window = []

    def work():
        for _ in range(3):
            t0 = time.perf_counter()
            p.matmul(x)
            window.append((t0, time.perf_counter()))

    ticks = []
    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    inside = 0
    for t0, t1 in window:
        a, b = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
        inside += sum(a < t < b for t in ticks)
    assert inside > 0, f"no Python ran during {window}"
