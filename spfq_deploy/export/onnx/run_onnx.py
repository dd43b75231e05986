#!/usr/bin/env python3
"""Run an exported spfq ONNX model on the device: copied into the export folder as run_onnx.py.

Needs only the runtime packages: numpy and onnxruntime (the target's version, e.g. 1.22.0 on
arm64); no torch, no spfq-deploy. The custom-op flavour needs its library for the device:

    python run_onnx.py model.spfq.onnx inputs.npz --library lib/arm64/libspfq_ort.so -o outputs.npz
    python run_onnx.py model.stock.onnx inputs.npz -o outputs.npz

Inputs are the arrays of the .npz by name. Writes the outputs as output_0, output_1, ... (the
session's output order) and prints one JSON line: output names and shapes, seconds per run
(--repeat runs after a first untimed one), onnxruntime's version and the library's own info.

Decoders exported with a KV cache (inputs input_ids + past_key_values.<i>.key/value, outputs
logits + present.<i>.key/value) also generate greedily:

    python run_onnx.py model.spfq.onnx prompt.npz --generate 128 --library lib/arm64/libspfq_ort.so

prompt.npz holds input_ids (1, prompt length); the first run (prefill) starts from an empty
cache, then each step feeds the argmax token and the cache back. The JSON line adds the
generated ids, prefill seconds and decode tokens/s; with -o, the ids go in as ``generated``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np


def decoder_threads(so) -> None:
    """Threads for decoding with the custom ops: a step is one GEMV per projection whose weights
    stream from memory, so the packed kernels' pool takes all `threads` and splits every
    projection of >= 65536 weights (SPFQ_PARALLEL_MIN_WORK, unless set: the default 2^20 keeps
    small in-cache layers on one thread); onnxruntime's own ops per step are tiny, so its
    intra-op pool stays at one thread. The caller sets SPFQ_NUM_THREADS as for any custom-op
    session. Measured, SmolLM2 4-bit g32, 2 threads: 139 vs 111 tok/s with both pools at 2 on a
    host loaded by another job; idle, the same within noise (184-200 tok/s either way, and 1
    thread 187-199): one core already draws most of the memory bandwidth a step needs."""
    so.intra_op_num_threads = 1
    os.environ.setdefault("SPFQ_PARALLEL_MIN_WORK", "65536")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the .onnx file")
    p.add_argument("inputs", help=".npz holding the model's inputs by name")
    p.add_argument("--library", help="the custom-op library (lib/<target>/libspfq_ort.so)")
    p.add_argument("-o", "--output", help="write the outputs here (.npz)")
    p.add_argument("--repeat", type=int, default=1, help="time this many runs after the first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--generate", type=int, metavar="N", help="decoders: greedily generate N tokens after the "
                   "prompt in the inputs' input_ids")
    p.add_argument("--eos", type=int, action="append", default=[], help="--generate stops at this token id "
                   "(repeatable)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    info = None
    if args.library:
        if args.generate is not None:
            decoder_threads(so)
        os.environ.setdefault("SPFQ_NUM_THREADS", str(args.threads))
        # the packed kernels have their own thread pool: ORT's threads must sleep, not spin
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.register_custom_ops_library(args.library)
        fn = ctypes.CDLL(args.library).SpfqOrtLibraryInfo
        fn.restype = ctypes.c_char_p
        info = fn().decode()
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    if args.generate is not None:
        with np.load(args.inputs) as data:
            prompt = np.asarray(data["input_ids"], dtype=np.int64)
        out = generate(sess, prompt, args.generate, set(args.eos))
        if args.output:
            np.savez(args.output, generated=np.asarray(out["generated"], dtype=np.int64))
        print(json.dumps({"model": args.model, **out, "onnxruntime": ort.__version__, "library_info": info}),
              flush=True)
        return 0
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


PAST, PRESENT = "past_key_values.", "present."


def empty_cache(sess, batch: int) -> dict:
    """Zero-length past tensors for every past_key_values.* input: (batch, heads, 0, head_dim)."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith(PAST):
            dims = [d if isinstance(d, int) else None for d in i.shape]
            if len(dims) != 4 or dims[1] is None or dims[3] is None:
                raise SystemExit(f"run_onnx.py: {i.name} has shape {i.shape}: expected (batch, heads, past, head_dim)")
            feeds[i.name] = np.zeros((batch, dims[1], 0, dims[3]), dtype=np.float32)
    if not feeds:
        raise SystemExit("run_onnx.py: --generate needs a decoder exported with past_key_values.* inputs")
    return feeds


def generate(sess, prompt: np.ndarray, steps: int, eos: set) -> dict:
    """Greedy decoding: prefill the prompt from an empty cache, then one token per run."""
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise SystemExit(f"run_onnx.py: input_ids must be (1, length >= 1), got {prompt.shape}")
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": prompt, **empty_cache(sess, 1)}
    t0 = time.perf_counter()
    outs = sess.run(None, feeds)
    prefill = time.perf_counter() - t0
    ids: list[int] = []
    t0 = time.perf_counter()
    for step in range(max(0, steps)):
        token = int(np.argmax(outs[0][0, -1]))
        ids.append(token)
        if token in eos or step == steps - 1:
            break
        feeds = {"input_ids": np.array([[token]], dtype=np.int64)}
        feeds.update({PAST + n[len(PRESENT):]: o for n, o in zip(names, outs) if n.startswith(PRESENT)})
        outs = sess.run(None, feeds)
    decode = time.perf_counter() - t0
    runs = max(0, len(ids) - 1)  # decode runs: the first new token comes from the prefill
    return {"prompt_tokens": int(prompt.shape[1]), "generated": ids, "prefill_seconds": prefill,
            "decode_seconds": decode, "decode_tokens_per_second": runs / decode if runs and decode > 0 else None}


if __name__ == "__main__":
    sys.exit(main())
