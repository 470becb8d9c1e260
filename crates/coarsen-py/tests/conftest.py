"""Shared helpers: the `coarsen` binary, safetensors files written and read in plain NumPy (an
independent reader, not coarsen's), and random layers."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]


def coarsen_binary() -> str | None:
    """``$COARSEN_BIN`` (scripts/test sets it), else ``coarsen`` on PATH."""
    env = os.environ.get("COARSEN_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise RuntimeError(f"COARSEN_BIN={env} is not an executable")
        return env
    return shutil.which("coarsen")


@pytest.fixture(scope="session")
def cli():
    """Runs the real `coarsen` binary; the tests that compare with it need it."""
    binary = coarsen_binary()
    if binary is None:
        pytest.skip("no coarsen binary: set COARSEN_BIN (scripts/test does) or put it on PATH")

    def run(*args: str) -> str:
        out = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
        if out.returncode != 0:
            raise AssertionError(f"coarsen {' '.join(map(str, args))}: {out.stderr}")
        return out.stdout

    return run


DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8", np.dtype(np.float64): "F64"}


def write_safetensors(path: Path, tensors: dict) -> None:
    """A safetensors file of `tensors` (name -> array), in name order."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.tobytes()
        header[name] = {
            "dtype": DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """The tensors (name -> array) and the `__metadata__` of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = raw[8 + n :]
    kinds = {"F32": np.float32, "U8": np.uint8, "F64": np.float64, "BOOL": np.bool_}
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype=kinds[t["dtype"]]).reshape(t["shape"])
    return out, meta


@pytest.fixture
def layers():
    """Weights of a small network: two convs (PyTorch layout), a linear layer, a bias and a
    BatchNorm counter."""
    rng = np.random.default_rng(7)
    return {
        "conv1.weight": rng.standard_normal((32, 16, 3, 3), dtype=np.float32),
        "conv2.weight": rng.standard_normal((64, 32, 3, 3), dtype=np.float32),
        "fc.weight": rng.standard_normal((10, 64), dtype=np.float32),
        "fc.bias": rng.standard_normal(10, dtype=np.float32),
    }
