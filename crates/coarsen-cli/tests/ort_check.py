"""ONNX Runtime against coarsen: runs each case's model.onnx on its input batch and compares the
logits with the ones coarsen computed. Used by the CLI tests (tests/onnx.rs).

Usage: python ort_check.py CASES.json, where CASES.json lists
{"label", "onnx", "input", "logits"} objects (.npy files, float32). Prints one JSON line per
case and exits 1 when a case differs by more than 1e-4 x max(1, |logit|).
"""

import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    failed = 0
    for case in cases:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            case["onnx"], options, providers=["CPUExecutionProvider"]
        )
        x = np.load(case["input"])
        want = np.load(case["logits"])
        got = session.run(["logits"], {"input": x})[0]
        scale = max(1.0, float(np.abs(want).max()))
        if got.shape != want.shape:
            err = float("inf")
        else:
            err = float(np.abs(got.astype(np.float64) - want).max())
        ok = err <= 1e-4 * scale
        failed += not ok
        print(json.dumps({"case": case["label"], "max_abs_diff": err, "scale": scale, "ok": ok}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
