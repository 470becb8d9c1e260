"""Pull the conv and MatMul/Gemm weights out of an ONNX model into a safetensors file that
`coarsen prune` and `coarsen convert` read, so any pretrained ONNX network can be pruned and
structured (and compared with each pattern's naive baseline) without its training code.

Weights come from initializers or Constant nodes. A MatMul's right operand `[in, out]` is
transposed to PyTorch's `[out, in]`; Gemm follows its `transB`; conv weights are kept as
`[out, in, kh, kw]`. Tensors under --min-size values are skipped.

    python examples/onnx_weights.py MODEL.onnx OUT.safetensors [--min-size 4096]

Needs `onnx`, `numpy` and `safetensors` (pip install onnx numpy safetensors).
"""

import argparse
import os
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an .onnx file")
    ap.add_argument("out", help="the .safetensors file to write")
    ap.add_argument("--min-size", type=int, default=4096, help="skip smaller weights (default 4096)")
    a = ap.parse_args()
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper
        from safetensors.numpy import save_file
    except ImportError as e:
        print(f"error: {e}; pip install onnx numpy safetensors", file=sys.stderr)
        return 2
    if os.path.abspath(a.model) == os.path.abspath(a.out):
        print("error: the output would replace the model", file=sys.stderr)
        return 2
    try:
        model = onnx.load(a.model)
    except Exception as e:  # a missing, truncated or foreign file
        print(f"error: {a.model}: not a readable ONNX model ({e})", file=sys.stderr)
        return 1
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for attr in n.attribute:
                if attr.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(attr.t)
    out = {}
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        w = values.get(n.input[1])
        if w is None or w.size < a.min_size or w.dtype not in (np.float32, np.float16, np.float64):
            continue
        if n.op_type == "Conv":
            if w.ndim != 4:
                continue
        elif n.op_type == "MatMul":
            if w.ndim != 2:
                continue
            w = w.T
        else:
            trans_b = next((attr.i for attr in n.attribute if attr.name == "transB"), 0)
            if w.ndim != 2:
                continue
            w = w if trans_b else w.T
        if not np.all(np.isfinite(w)):
            print(f"error: {n.name or n.op_type}: non-finite weights", file=sys.stderr)
            return 1
        name = (n.name or f"{n.op_type.lower()}_{i}").replace("/", ".") + ".weight"
        if name in out:  # node names need not be unique: never let one weight replace another
            name = f"{name[: -len('.weight')]}_{i}.weight"
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    if not out:
        print("error: no conv or MatMul weights of that size", file=sys.stderr)
        return 1
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(a.out)) or ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(out, tmp)
        os.replace(tmp, a.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    total = sum(w.size for w in out.values())
    print(f"wrote {a.out}: {len(out)} weights, {total} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
