#!/usr/bin/env python3
"""Run an exported spfq ONNX model on the device: copied into the export folder as run_onnx.py.

Needs only the runtime packages: numpy and onnxruntime (the target's version, e.g. 1.22.0 on
arm64); no torch, no spfq-deploy. The custom-op flavour needs its library for the device:

    python run_onnx.py model.spfq.onnx inputs.npz --library lib/arm64/libspfq_ort.so -o outputs.npz
    python run_onnx.py model.stock.onnx inputs.npz -o outputs.npz

Inputs are the arrays of the .npz by name. Writes the outputs as output_0, output_1, ... (the
session's output order) and prints one JSON line: output names and shapes, seconds per run
(--repeat runs after a first untimed one), onnxruntime's version and the library's own info.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the .onnx file")
    p.add_argument("inputs", help=".npz holding the model's inputs by name")
    p.add_argument("--library", help="the custom-op library (lib/<target>/libspfq_ort.so)")
    p.add_argument("-o", "--output", help="write the outputs here (.npz)")
    p.add_argument("--repeat", type=int, default=1, help="time this many runs after the first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    info = None
    if args.library:
        os.environ.setdefault("SPFQ_NUM_THREADS", str(args.threads))
        # the packed kernels have their own thread pool: ORT's threads must sleep, not spin
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.register_custom_ops_library(args.library)
        fn = ctypes.CDLL(args.library).SpfqOrtLibraryInfo
        fn.restype = ctypes.c_char_p
        info = fn().decode()
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    with np.load(args.inputs) as data:
        feeds = {i.name: np.ascontiguousarray(data[i.name]) for i in sess.get_inputs()}
    outs = sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(max(1, args.repeat)):
        sess.run(None, feeds)
    seconds = (time.perf_counter() - t0) / max(1, args.repeat)
    if args.output:
        np.savez(args.output, **{f"output_{j}": o for j, o in enumerate(outs)})
    print(json.dumps({"model": args.model, "outputs": [o.name for o in sess.get_outputs()],
                      "shapes": [list(np.shape(o)) for o in outs], "seconds_per_run": seconds,
                      "onnxruntime": ort.__version__, "library_info": info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
