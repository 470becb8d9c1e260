#!/usr/bin/env python3
"""Reference loader and runner for coarsen exports (format version 2), in numpy alone.

An export directory holds two files:

  model.json         "graph" (the network), "classes", optional "labels", and optional
                     "preprocessing" {"mean", "std"}: per-channel statistics of pixels scaled
                     to [0, 1]; an image is fed as (pixel/255 - mean[c]) / std[c].
  model.safetensors  the tensors. A masked conv or linear weight W (model.json's "layers"
                     entry with "masked": true gives its shape) is stored as W.mask_bits (U8:
                     the 0/1 mask over W's row-major flat index, 8 to a byte, least significant
                     bit first) and W.values (F32: the kept weights, in row-major order). Every
                     other tensor is stored whole as W (F32, its own shape).

The graph takes one input, a batch [N, C, H, W] (graph["input"] is [C, H, W]), and runs
graph["nodes"] in order. Each node reads earlier values by name ("input", or an earlier
node's name) and writes one value named after itself; every value is an NCHW batch, and
graph["output"] names the node that gives the logits [N, classes, 1, 1].

Usage:
  python numpy_reference.py EXPORT_DIR [--data DIR] [--limit N] [--batch B] [--logits-out F.npy]
  python numpy_reference.py EXPORT_DIR --input X.npy [--logits-out F.npy]

The first prints the test accuracy on an MNIST-format (IDX) or CIFAR-10 binary data
directory, as `coarsen eval` does; the second runs a float32 NCHW array that is already
normalised and prints (or saves) the logits.
"""

import argparse
import functools
import gzip
import json
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class ExportError(Exception):
    """A file that is not what it claims to be."""


def check(ok, message):
    if not ok:
        raise ExportError(message)


def is_uints(v, length=None):
    ints = isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)
    return ints and (length is None or len(v) == length)


# ---------------------------------------------------------------------------- the files

DTYPES = {"F32": np.dtype("<f4"), "U8": np.dtype("u1")}  # all that coarsen writes


def read_safetensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then the data
    (offsets count from the end of the header)."""
    raw = path.read_bytes()
    check(len(raw) >= 8, f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    check(n <= len(raw) - 8, f"{path}: a {n}-byte header in a {len(raw)}-byte file")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise ExportError(f"{path}: the header is not JSON ({e})") from None
    check(isinstance(header, dict), f"{path}: the header is not a JSON object")
    data = memoryview(raw)[8 + n :]
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(t, dict) and isinstance(t.get("dtype"), str) and is_uints(t.get("shape"))
        check(ok and is_uints(t.get("data_offsets"), 2), f"{path}: '{name}': a malformed entry")
        begin, end = t["data_offsets"]
        check(begin <= end <= len(data), f"{path}: tensor '{name}' lies outside the file")
        tensors[name] = (t["dtype"], tuple(t["shape"]), data[begin:end])
    return tensors


def load_export(directory):
    """(manifest, {tensor name: float32 array}) of an export directory, masks applied."""
    mpath, tpath = directory / "model.json", directory / "model.safetensors"
    try:
        manifest = json.loads(mpath.read_bytes())
    except ValueError as e:
        raise ExportError(f"{mpath}: not JSON ({e})") from None
    ok = isinstance(manifest, dict) and manifest.get("format") == "coarsen-export"
    check(ok, f"{mpath}: not a coarsen export description")
    version = manifest.get("version")
    check(version == 2, f"{mpath}: version {version}; this reads version 2 (re-export it)")
    file = read_safetensors(tpath)

    def tensor(name, dtype):
        check(name in file, f"{tpath}: no tensor '{name}'")
        got, shape, data = file[name]
        check(got == dtype, f"{tpath}: tensor '{name}' is {got}, expected {dtype}")
        size = math.prod(shape) * DTYPES[dtype].itemsize
        check(len(data) == size, f"{tpath}: tensor '{name}' {list(shape)} has {len(data)} bytes")
        return np.frombuffer(data, DTYPES[dtype]).reshape(shape)

    def masked_weight(name, shape):
        n = math.prod(shape)
        bits = tensor(f"{name}.mask_bits", "U8")
        check(bits.shape == ((n + 7) // 8,), f"{tpath}: '{name}.mask_bits' does not fit {shape}")
        mask = np.unpackbits(bits, bitorder="little")
        check(not mask[n:].any(), f"{tpath}: '{name}.mask_bits' sets bits past its {n} entries")
        mask = mask[:n].astype(bool)
        values = tensor(f"{name}.values", "F32")
        kept = int(mask.sum())
        bad = f"{tpath}: '{name}.values' is {list(values.shape)}, its mask keeps {kept}"
        check(values.shape == (kept,), bad)
        weight = np.zeros(n, np.float32)
        weight[mask] = values  # boolean indexing walks the mask in row-major order
        return weight.reshape(shape)

    try:
        graph = manifest["graph"]
        masked = {l["name"]: l["shape"] for l in manifest["layers"] if l["masked"]}
        check(all(is_uints(s) for s in masked.values()), f"{mpath}: a malformed layer shape")
        params = {}
        for node in graph["nodes"]:
            for role in ("weight", "bias", "scale", "mean", "var"):
                name = node.get(role)
                if isinstance(name, str) and name in masked:
                    params[name] = masked_weight(name, masked[name])
                elif isinstance(name, str):
                    params[name] = tensor(name, "F32")
        check(is_uints(graph["input"], 3) and all(graph["input"]), f"{mpath}: bad graph input")
        prep = manifest.get("preprocessing")
        if prep is not None:
            c = graph["input"][0]
            mean, std = (np.asarray(prep[k], np.float32) for k in ("mean", "std"))
            ok = mean.shape == std.shape == (c,) and np.isfinite(mean).all() and (std > 0).all()
            check(ok, f"{mpath}: preprocessing needs {c} finite means and {c} positive stds")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ExportError(f"{mpath}: a missing or malformed field ({e!r})") from None
    # One image through the graph checks every node's shapes before any real work.
    classes = forward(graph, params, np.zeros((1, *graph["input"]), np.float32)).shape[1]
    said = manifest.get("classes")
    check(classes == said, f"{mpath}: says {said} classes, its graph gives {classes}")
    return manifest, params


# ---------------------------------------------------------------------------- the ops


def windows(x, kernel, stride, padding, dilation, fill):
    """Every window of x [N, C, H, W] padded with `fill` ([top, left, bottom, right]): a
    view [N, C, Ho, Wo, kh, kw] (output sizes rounded down, as in PyTorch)."""
    geometry = (list(kernel), list(stride), list(padding), list(dilation))
    check(all(is_uints(v, n) for v, n in zip(geometry, (2, 2, 4, 2))), "malformed geometry")
    check(min(*kernel, *stride, *dilation) > 0, "kernel, stride and dilation must be positive")
    top, left, bottom, right = padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    check(x.shape[2] >= span[0] and x.shape[3] >= span[1], "the window exceeds the input")
    view = sliding_window_view(x, span, axis=(2, 3))
    return view[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


def bias_of(params, node, channels):
    """The node's bias [channels] (zeros when it has none)."""
    if node.get("bias") is None:
        return np.zeros(channels, np.float32)
    b = params[node["bias"]]
    check(b.shape == (channels,), f"bias {list(b.shape)}, expected [{channels}]")
    return b


def conv(params, node, x):
    """y[n,o,i,j] = bias[o] + sum_{c,ky,kx} w[o,c,ky,kx] x[n, g*C/G + c, i*sh + ky*dh - pt,
    j*sw + kx*dw - pl], zero padding, g the group of o: im2col and a matrix product."""
    w, groups, c = params[node["weight"]], node["groups"], x.shape[1]
    check(w.ndim == 4, f"weight {list(w.shape)} is not [Cout, Cin/groups, kh, kw]")
    cout, cin_g, kh, kw = w.shape
    ok = type(groups) is int and groups > 0 and cout % groups == 0 and cin_g * groups == c
    check(ok, f"weight {list(w.shape)} with {groups!r} groups does not read {c} channels")
    check(list(node["kernel"]) == [kh, kw], f"kernel {node['kernel']} differs from the weight")
    view = windows(x, (kh, kw), node["stride"], node["padding"], node["dilation"], 0.0)
    n, _, ho, wo = view.shape[:4]
    # im2col: rows (c, ky, kx) like the weight's, columns (n, i, j); copied row by row.
    cols = view.transpose(1, 4, 5, 0, 2, 3).reshape(groups, cin_g * kh * kw, n * ho * wo)
    y = w.reshape(groups, cout // groups, cin_g * kh * kw) @ cols  # [G, Cout/G, N*Ho*Wo]
    y = y.reshape(cout, n, ho, wo) + bias_of(params, node, cout).reshape(cout, 1, 1, 1)
    return np.ascontiguousarray(y.transpose(1, 0, 2, 3))


def linear(params, node, x):
    """y[n,o] = bias[o] + sum_i w[o,i] x[n,i], on an [N, F, 1, 1] input."""
    n, f = x.shape[:2]
    w = params[node["weight"]]
    check(x.shape[2:] == (1, 1), f"reads {list(x.shape[1:])}; flatten first")
    check(w.ndim == 2 and w.shape[1] == f, f"weight {list(w.shape)} does not read {f} features")
    y = x.reshape(n, f) @ w.T + bias_of(params, node, w.shape[0])
    return y.reshape(n, -1, 1, 1)


def batch_norm(params, node, x):
    """y = (x - mean[c]) / sqrt(var[c] + epsilon) * scale[c] + bias[c]."""
    c, eps = x.shape[1], node["epsilon"]
    tensors = [params[node[k]] for k in ("scale", "bias", "mean", "var")]
    check(all(t.shape == (c,) for t in tensors), f"its tensors are not [{c}]")
    check(type(eps) in (int, float) and 0 <= eps < math.inf, f"epsilon {eps} is not >= 0")
    scale, bias, mean, var = tensors
    mul = scale / np.sqrt(var + np.float32(eps))  # the same affine map, in two passes over x
    return x * mul.reshape(c, 1, 1) + (bias - mean * mul).reshape(c, 1, 1)


def pool_windows(node, x, fill):
    """The windows of a pooling node, padded with `fill`."""
    k, pad = node["kernel"], node["padding"]
    view = windows(x, k, node["stride"], pad, (1, 1), fill)
    check(all(pad[a] < k[a % 2] for a in range(4)), f"padding {pad} must be under the window {k}")
    return view


def taps(view):
    """The kh*kw slices [N, C, Ho, Wo] of a window view (faster to reduce than its last axes)."""
    return [view[..., i, j] for i in range(view.shape[4]) for j in range(view.shape[5])]


def max_pool(params, node, x):
    """The maximum over each window; padding never wins."""
    return functools.reduce(np.maximum, taps(pool_windows(node, x, -np.inf)))


def avg_pool(params, node, x):
    """The mean over each window; padded positions count when count_include_pad."""
    total = sum(taps(pool_windows(node, x, 0.0)))
    if node["count_include_pad"]:
        return total / np.float32(math.prod(node["kernel"]))  # windows never pass the padding
    inside = sum(taps(pool_windows(node, np.ones((1, 1, *x.shape[2:]), np.float32), 0.0)))
    return total / inside


OPS = {
    "conv": conv,
    "linear": linear,
    "batch_norm": batch_norm,
    "relu": lambda params, node, x: np.maximum(x, 0),
    "max_pool": max_pool,
    "avg_pool": avg_pool,
    "global_avg_pool": lambda params, node, x: x.mean(axis=(2, 3), keepdims=True),
    "flatten": lambda params, node, x: x.reshape(len(x), -1, 1, 1),  # index c*H*W + y*W + x
    "add": lambda params, node, a, b: a + b,
}


def forward(graph, params, x):
    """Logits [N, classes] of the NCHW float32 batch x."""
    values = {"input": x}
    for node in graph["nodes"]:
        name, op, inputs = node.get("name"), node.get("op"), node.get("inputs")
        where = f"model.json: node '{name}' ({op})"
        check(isinstance(name, str) and name not in values, f"{where}: a missing or taken name")
        check(isinstance(op, str) and op in OPS, f"{where}: unknown op")
        arity = isinstance(inputs, list) and len(inputs) == (2 if op == "add" else 1)
        check(arity, f"{where}: wrong number of inputs")
        known = all(isinstance(i, str) and i in values for i in inputs)
        check(known, f"{where}: reads a value not yet written")
        args = [values[i] for i in inputs]
        check(op != "add" or args[0].shape == args[1].shape, f"{where}: adds unequal shapes")
        try:
            values[name] = OPS[op](params, node, *args)
        except ExportError as e:
            raise ExportError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{where}: a missing or malformed field ({e!r})") from None
    out = values.get(str(graph.get("output")))
    check(out is not None and out.shape[2:] == (1, 1), "model.json: the output is no logits")
    return out.reshape(len(x), -1)


# ---------------------------------------------------------------------------- the data


def read_file(path):
    """The bytes of a file, gunzipped when it is gzip data."""
    raw = path.read_bytes()
    try:
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise ExportError(f"{path}: corrupt gzip data ({e})") from None


def read_idx(directory, stem, rank):
    """An IDX file of unsigned bytes (`stem` or `stem.gz`): magic 0x0000080R, R big-endian
    u32 dimensions, the bytes."""
    path = next((p for p in (directory / stem, directory / f"{stem}.gz") if p.exists()), None)
    check(path is not None, f"{directory}: no {stem}(.gz) or CIFAR-10 test_batch.bin")
    raw = read_file(path)
    check(raw[:4] == bytes([0, 0, 8, rank]), f"{path}: not an IDX file of rank {rank}")
    dims = struct.unpack(f">{rank}I", raw[4 : 4 + 4 * rank])
    check(len(raw) == 4 + 4 * rank + math.prod(dims), f"{path}: {dims} does not fit its size")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(dims)


def read_test_set(directory):
    """(pixels [N, C, H, W] as uint8, labels [N]) of the test split of a data directory."""
    check(directory.is_dir(), f"{directory}: no such directory")
    for d in (directory, directory / "cifar-10-batches-bin"):
        if (d / "test_batch.bin").exists():  # CIFAR-10: records of a label and 3x32x32 bytes
            raw = read_file(d / "test_batch.bin")
            check(len(raw) % 3073 == 0, f"{d / 'test_batch.bin'}: not whole CIFAR-10 records")
            rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
            return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0]
    images = read_idx(directory, "t10k-images-idx3-ubyte", 3)
    labels = read_idx(directory, "t10k-labels-idx1-ubyte", 1)
    check(len(images) == len(labels), f"{directory}: {len(labels)} labels, {len(images)} images")
    return images[:, None], labels


# ---------------------------------------------------------------------------- the command


def run(graph, params, x, batch):
    """Logits [N, classes] of x, `batch` images at a time."""
    check(len(x) > 0, "no images")
    starts = range(0, len(x), batch)
    return np.concatenate([forward(graph, params, x[i : i + batch]) for i in starts])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="a coarsen export directory (format version 2)")
    ap.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="MNIST-format (IDX) or CIFAR-10 binary data [%(default)s]")
    ap.add_argument("--input", type=Path, help="a float32 NCHW .npy batch, already normalised")
    ap.add_argument("--limit", type=int, help="only the first N images")
    ap.add_argument("--batch", type=int, default=64, help="images per forward pass")
    ap.add_argument("--logits-out", type=Path, help="save the logits [N, classes] as .npy")
    a = ap.parse_args(argv)
    if a.batch < 1 or (a.limit is not None and a.limit < 1):
        ap.error("--batch and --limit must be positive")
    try:
        manifest, params = load_export(a.export)
        graph, shape = manifest["graph"], tuple(manifest["graph"]["input"])
        if a.input is not None:
            try:
                x = np.load(a.input, allow_pickle=False)
            except ValueError as e:
                raise ExportError(f"{a.input}: not a .npy array ({e})") from None
            ok = x.ndim == 4 and x.shape[1:] == shape and np.issubdtype(x.dtype, np.floating)
            want = ", ".join(map(str, shape))
            check(ok, f"{a.input}: {x.dtype} {list(x.shape)}; the network reads [N, {want}]")
            logits = run(graph, params, x[: a.limit].astype(np.float32), a.batch)
        else:
            prep = manifest.get("preprocessing")
            check(prep is not None, f"{a.export}: records no preprocessing (an export of "
                  "`coarsen export --model`); normalise the images yourself and give --input")
            pixels, labels = read_test_set(a.data)
            check(pixels.shape[1:] == shape, f"{a.data}: images {list(pixels.shape[1:])}, "
                  f"the network reads {list(shape)}")
            pixels, labels = pixels[: a.limit], labels[: a.limit]
            mean, std = (np.float32(prep[k]).reshape(-1, 1, 1) for k in ("mean", "std"))
            x = (pixels.astype(np.float32) / np.float32(255) - mean) / std  # as coarsen, in f32
            logits = run(graph, params, x, a.batch)
            correct = int((logits.argmax(axis=1) == labels).sum())
            print(f"test accuracy {100.0 * (correct / len(labels)):.2f}% ({len(labels)} images)")
        if a.logits_out is not None:
            np.save(a.logits_out, logits)
        elif a.input is not None:
            names = manifest.get("labels") or []
            if len(names) != logits.shape[1]:
                names = [str(k) for k in range(logits.shape[1])]
            for i, row in enumerate(logits):
                print(f"{i}: {names[row.argmax()]}  " + " ".join(f"{v:.5g}" for v in row))
    except (ExportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
