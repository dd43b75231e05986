"""Speed cost of group-wise scales (--group-size) in the kernels: per-row scales against G = 32,
64, 128 on the same codes, timed interleaved round by round in one process (this shared 2-core
machine's noise hits every entry alike), medians.

    python benchmarks/grouped.py [--shape 1,4096,4096] [--bits 4] [--threads 1] [--rounds 30]

Entries per configuration: int8 activations (matmul_i8: quantised input given), float input
quantised in the call (matmul_q8) and weight-only float (matmul_f32). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spfq_deploy import kernels as K  # noqa: E402
from spfq_deploy.compressed import CompressedLayer  # noqa: E402


def layer(n: int, k: int, bits: int, group: int, rng) -> CompressedLayer:
    top = 2 ** (bits - 1) - 1
    codes = rng.integers(-top, top + 1, size=(n, k)).astype(np.int8)
    shape = (n, -(-k // group)) if group else (n,)
    scale = (rng.random(shape) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    return CompressedLayer("fc", "linear", (n, k), "int", bits, codes, scale, group_size=group)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,4096,4096", help="M,N,K")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    m, n, k = (int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    base = layer(n, k, args.bits, 0, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xq, xs = K.quantize_i8(x)
    weights = {"per row": K.PackedWeights.from_layer(base, "planes")}
    for g in (32, 64, 128):
        grouped = layer(n, k, args.bits, g, rng)
        grouped.codes = base.codes  # the same codes: only the scales differ
        weights[f"G={g}"] = K.GroupedWeights.from_layer(grouped, "planes")
    calls = {"i8": lambda w: w.matmul_i8(xq, xs, args.threads), "q8": lambda w: w.matmul_q8(x, args.threads),
             "f32": lambda w: w.matmul_f32(x, args.threads)}
    times: dict[tuple[str, str], list[float]] = {(c, name): [] for c in calls for name in weights}
    for (c, name) in times:  # warm up (tables, repacks built by first calls)
        calls[c](weights[name])
    for _ in range(args.rounds):
        for (c, name), ts in times.items():
            t0 = time.perf_counter()
            calls[c](weights[name])
            ts.append(time.perf_counter() - t0)
    print(f"{args.bits}-bit {m}x{n}x{k} (M x N x K), {args.threads} thread(s), ISA {K.isa()}, "
          f"median of {args.rounds} interleaved rounds")
    print("| call | per row (ms) | G=32 (ms) | G=64 (ms) | G=128 (ms) |")
    print("|---|---|---|---|---|")
    for c in calls:
        base_ms = 1e3 * float(np.median(times[(c, "per row")]))
        cells = [f"{base_ms:.3f}"]
        for g in (32, 64, 128):
            ms = 1e3 * float(np.median(times[(c, f"G={g}")]))
            cells.append(f"{ms:.3f} ({ms / base_ms:.2f}x)")
        print(f"| {c} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
