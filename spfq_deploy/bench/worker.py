"""One timing process: `python -m spfq_deploy.bench.worker PLAN.json` prints one JSON line.

Started by core.bench() with SPFQ_NUM_THREADS / TVM_NUM_THREADS / OMP_NUM_THREADS set to the
plan's thread count before anything starts a thread pool. Each artifact is loaded once and timed
per batch size: `warmup` calls, then `repeat` timed calls (median, p10, p90 of the wall time per
call; the same statistics as benchmarks/onnx_latency.py's timeit).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def timeit(run, warmup: int, repeat: int) -> dict:
    for _ in range(warmup):
        run()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        run()
        ts.append(time.perf_counter_ns() - t0)
    ts = np.array(ts) / 1e6
    return {"median_ms": float(np.median(ts)), "p10_ms": float(np.percentile(ts, 10)),
            "p90_ms": float(np.percentile(ts, 90)), "samples": len(ts)}


def batch_of(arrays: dict, batch: int) -> dict:
    """The rows of each input repeated (then cut) to `batch` rows along axis 0."""
    out = {}
    for k, a in arrays.items():
        reps = -(-batch // len(a))
        out[k] = np.ascontiguousarray(np.concatenate([a] * reps, axis=0)[:batch])
    return out


def _caller(art: dict, threads: int):
    """A function feeds -> outputs for one artifact (loaded once)."""
    if art["runtime"] == "onnxruntime":
        from ..export.onnx.session import session

        sess = session(art["path"], art.get("library"), accuracy_level=art.get("accuracy_level"), threads=threads)
        return lambda feeds: sess.run(None, feeds)
    from ..export.tvm import runtime as tvm_export

    vm, _ = tvm_export.load(art["path"])
    names = art["input_names"]
    return lambda feeds: tvm_export.run(vm, *[feeds[n] for n in names])


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    threads = plan["threads"]
    with np.load(plan["inputs"], allow_pickle=False) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    feeds_by_batch = {b: batch_of(arrays, b) for b in plan["batches"]}
    rows = []
    for art in plan["artifacts"]:
        try:
            call = _caller(art, threads)
        except Exception as exc:  # a row's error, never the whole run
            rows.append({"artifact": art["name"], "threads": threads, "error": str(exc).strip().splitlines()[0][:300]})
            continue
        for b, feeds in feeds_by_batch.items():
            row = {"artifact": art["name"], "batch": b, "threads": threads}
            try:
                row.update(timeit(lambda: call(feeds), plan["warmup"], plan["repeat"]))
            except Exception as exc:
                row["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            rows.append(row)
    print(json.dumps({"threads": threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
