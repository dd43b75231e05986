"""Compression time of MiniLM (all 36 Linear layers, 256 calibration sentences) per method.

    python benchmarks/compress_time.py --out benchmarks/results/compress_time.json

Goal (PERF.md): <= 60 s on the 2-core machine. Writes JSON with wall seconds per method and
bit width, the calibration row count, and the thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.minilm as minilm  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.compress import compress_model  # noqa: E402

GOAL_SECONDS = 60.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="gpfq,spfq,rtn")
    ap.add_argument("--bits", default="1,4")
    ap.add_argument("--out", default="benchmarks/results/compress_time.json")
    args = ap.parse_args(argv)
    model = minilm.build()
    calib = minilm.calibration(256)
    rows = sum(int(b.numel()) for b in calib)
    runs = []
    for bits in args.bits.split(","):
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            res = compress_model(model, calib, bits=int(bits), method=method, progress=False)
            secs = time.perf_counter() - t0
            runs.append({"method": method, "bits": int(bits), "seconds": secs, "layers": len(res.report),
                         "within_goal": secs <= GOAL_SECONDS})
            print(f"MiniLM {len(res.report)} layers, {bits}-bit {method}: {secs:.1f} s "
                  f"(goal <= {GOAL_SECONDS:.0f} s)", flush=True)
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "calibration": {"sentences": 256, "token_rows": rows}, "goal_seconds": GOAL_SECONDS, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
