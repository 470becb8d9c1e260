#!/usr/bin/env python3
"""Timing worker of scripts/bench-peers for ONNX Runtime and DeepSparse.

Follows the protocol of `coarsen bench --serve`:

1. loads the model, runs one forward pass on the input batch (a float32 NCHW .npy array), saves
   the logits [N, classes] as float32 to --logits-out, then prints one JSON line
   {"ready": true, "engine": ..., "detail": ...};
2. reads commands on stdin, one per line: `run K` runs K timed forward passes on the same input
   and prints {"times_ms": [...]}; `quit` or end of input exits 0.

Errors go to stderr with a non-zero exit. Only numpy and the engine are needed, so it runs in
either venv (the DeepSparse one must be used for --engine deepsparse).
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def ort_engine(model, x, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise SystemExit(f"worker: {model}: expected one input, found {len(inputs)}")
    name = inputs[0].name
    out = sess.get_outputs()[0].name
    feed = {name: x}

    def forward():
        return sess.run([out], feed)[0]

    detail = (
        f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra-op {threads}, "
        f"inter-op 1, sequential, ORT_ENABLE_ALL"
    )
    return forward, "onnxruntime", detail


def deepsparse_engine(model, x, threads):
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network calls from a benchmark
    import deepsparse

    engine = deepsparse.Engine(model=model, batch_size=x.shape[0], num_cores=threads)
    inp = [x]

    def forward():
        return engine.run(inp, val_inp=False)[0]

    # The first call validates the input against the model.
    engine.run(inp, val_inp=True)
    detail = f"deepsparse {deepsparse.__version__}, batch {x.shape[0]}, {threads} core(s)"
    return forward, "deepsparse", detail


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["ort", "deepsparse"], required=True)
    p.add_argument("--model", required=True, help="model.onnx")
    p.add_argument("--input", required=True, help="float32 NCHW .npy batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--logits-out", required=True, help="where to save the logits (.npy)")
    a = p.parse_args()

    # The protocol owns stdout: keep a private copy of it and send anything the engines' native
    # code prints to stderr instead.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def say(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    x = np.ascontiguousarray(np.load(a.input), dtype=np.float32)
    if x.ndim != 4:
        raise SystemExit(f"worker: {a.input}: expected an NCHW array, found shape {x.shape}")
    make = ort_engine if a.engine == "ort" else deepsparse_engine
    forward, engine, detail = make(a.model, x, a.threads)
    logits = np.asarray(forward(), dtype=np.float32).reshape(x.shape[0], -1)
    np.save(a.logits_out, logits)
    say({"ready": True, "engine": engine, "detail": detail})

    clock = time.perf_counter  # monotonic
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit" and len(cmd) == 1:
            break
        if cmd[0] == "run" and len(cmd) == 2 and cmd[1].isdigit():
            times = []
            for _ in range(int(cmd[1])):
                t0 = clock()
                forward()
                times.append((clock() - t0) * 1e3)
            say({"times_ms": times})
            continue
        print(f"worker: `{line.strip()}`: expected `run K` or `quit`", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
