"""Compression cost against depth: the sequential engine against the replay engine, same run.

    python benchmarks/compress_scaling.py --out benchmarks/results/compress_scaling.json

Synthetic residual stacks (LayerNorm -> Linear -> ReLU -> Linear, + the residual; 2 layers a
block) of 8..64 blocks, 256 calibration samples of 32 tokens, 4-bit GPFQ: seconds per layer
for each engine (goal: flat within 1.5x from 8 to 64 blocks for the sequential one). Then the
real MiniLM (36 layers, 256 sentences) with both engines; MobileNetV2 (examples/mobilenetv2.py,
53 layers, 256 photo crops at 224x224) at 4 bits and ternary with peak RSS against the memory
budget + model size; and MiniLM under torchrun, 2 ranks against 1 (1 thread per process each):
path-following seconds, end to end, and whether the files are byte-identical. Every
measurement runs in its own process (peak RSS is per process); the JSON records the load
average, threads and ISA, and whether both engines wrote the same codes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAT_GOAL = 1.5  # seconds per layer at 64 blocks / at 8 blocks, sequential engine
MINILM_GOAL_S = 20.0
MOBILENET_GOAL_S = 180.0
DIST_PF_GOAL = 1.6  # path-following speed-up, 2 ranks vs 1
DIST_REPEATS = 3  # alternating 1-rank / 2-rank runs; the summary takes medians
BUDGET = 4 * 2 ** 30  # the default --memory-budget


def _stack(blocks: int, d: int = 128):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    torch.manual_seed(blocks)
    model = nn.Sequential(*[Block() for _ in range(blocks)]).eval()
    x = torch.randn(256, 32, d, generator=torch.Generator().manual_seed(0))
    return model, [x[i:i + 32] for i in range(0, 256, 32)]


def one(kind: str, size: int, engine: str, bits: str) -> dict:
    """One compression in this process: seconds, layers, peak RSS, a hash of the codes."""
    import torch

    from spfq_deploy.compress import compress_model

    if kind == "stack":
        model, calib = _stack(size)
    elif kind == "mobilenetv2":
        import examples.mobilenetv2 as mb
        model, calib = mb.build(), mb.calibration(size)
    else:
        import examples.minilm as minilm
        model, calib = minilm.build(), minilm.calibration(size)
    t0 = time.perf_counter()
    res = compress_model(model, calib, bits=bits, method="gpfq", engine=engine, progress=False)
    secs = time.perf_counter() - t0
    h = hashlib.sha256()
    for name in sorted(res.model.layers):
        h.update(res.model.layers[name].codes.tobytes())
    return {"kind": kind, "size": size, "engine": res.engine["engine"], "bits": bits, "seconds": secs,
            "layers": len(res.report), "seconds_per_layer": secs / len(res.report),
            "path_following_seconds": sum(r.seconds for r in res.report),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_activation_mib": res.engine["peak_activation_bytes"] / 2 ** 20,
            "codes_sha256": h.hexdigest(), "threads": torch.get_num_threads(),
            "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}


def _run(*argv) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", *map(str, argv)], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise SystemExit(f"compress_scaling: {argv} failed: {r.stderr.strip().splitlines()[-1:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["load_average"] = os.getloadavg()[0]
    print(f"{row['kind']} {row['size']:>4} {row['engine']:<10} {row['bits']:>2}-bit: {row['seconds']:7.1f} s, "
          f"{row['seconds_per_layer']:.3f} s/layer ({row['layers']} layers), RSS {row['peak_rss_mib']:.0f} MiB",
          flush=True)
    return row


def _ranks(ranks: int, out: Path) -> dict:
    """MiniLM 4-bit through the CLI, one process or torchrun with `ranks`, 1 thread each."""
    cmd = ["-m", "spfq_deploy", "compress", "examples/minilm.py", "--bits", "4", "--threads", "1", "-q",
           "-o", str(out), "--report-json", str(out) + ".json"]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *cmd]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    secs = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"compress_scaling: {ranks} ranks failed: {r.stderr.strip().splitlines()[-1:]}")
    report = json.loads(Path(str(out) + ".json").read_text())
    row = {"kind": "minilm-torchrun", "ranks": ranks, "threads_per_rank": 1, "seconds": secs,
           "path_following_seconds": sum(x["seconds"] for x in report),
           "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "load_average": os.getloadavg()[0]}
    print(f"minilm {ranks} rank(s): {secs:.1f} s end to end, path following {row['path_following_seconds']:.1f} s",
          flush=True)
    return row


def _isa() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512f" if " avx512f" in flags else "avx2" if " avx2" in flags else platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=4, metavar=("KIND", "SIZE", "ENGINE", "BITS"), help=argparse.SUPPRESS)
    ap.add_argument("--blocks", default="8,16,32,64")
    ap.add_argument("--replay-max-blocks", type=int, default=32, help="the replay engine is quadratic: stop here")
    ap.add_argument("--minilm-sentences", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/compress_scaling.json")
    args = ap.parse_args(argv)
    if args.one:
        kind, size, engine, bits = args.one
        print(json.dumps(one(kind, int(size), engine, bits)))
        return
    from spfq_deploy.atomic import write_text

    rows = []
    for blocks in map(int, args.blocks.split(",")):
        rows.append(_run("stack", blocks, "sequential", 4))
        if blocks <= args.replay_max_blocks:
            rows.append(_run("stack", blocks, "replay", 4))
    for bits in ("4", "1"):
        rows += [_run("minilm", args.minilm_sentences, "sequential", bits),
                 _run("minilm", args.minilm_sentences, "replay", bits)]
    for bits in ("4", "ternary"):
        rows.append(_run("mobilenetv2", 256, "sequential", bits))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        # this machine's speed drifts by ~25% from run to run: alternate 1 and 2 ranks, take medians
        dist = [_ranks(n, Path(tmp) / f"r{n}-{i}.spfq") for i in range(DIST_REPEATS) for n in (1, 2)]
    seq = {r["size"]: r for r in rows if r["kind"] == "stack" and r["engine"] == "sequential"}
    lo, hi = min(seq), max(seq)
    flat = seq[hi]["seconds_per_layer"] / seq[lo]["seconds_per_layer"]
    same = all(a["codes_sha256"] == b["codes_sha256"] for a in rows for b in rows
               if a["kind"] == b["kind"] and a["size"] == b["size"] and a["bits"] == b["bits"])
    minilm = {r["bits"]: r for r in rows if r["kind"] == "minilm" and r["engine"] == "sequential"}
    mobile = {r["bits"]: r for r in rows if r["kind"] == "mobilenetv2"}
    med = {n: {k: statistics.median(r[k] for r in dist if r["ranks"] == n) for k in ("seconds", "path_following_seconds")}
           for n in (1, 2)}
    pf_speedup = med[1]["path_following_seconds"] / med[2]["path_following_seconds"]
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "isa": _isa(), "cores": os.cpu_count()},
           "summary": {"stack_seconds_per_layer_ratio": {"blocks": [lo, hi], "ratio": flat, "goal": FLAT_GOAL,
                                                         "within_goal": flat <= FLAT_GOAL},
                       "minilm_seconds": {b: r["seconds"] for b, r in minilm.items()},
                       "minilm_goal_seconds": MINILM_GOAL_S,
                       "minilm_within_goal": all(r["seconds"] <= MINILM_GOAL_S for r in minilm.values()),
                       "same_codes_both_engines": same,
                       "mobilenetv2": {b: {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                                           "limit_mib": (BUDGET + r["model_bytes"]) / 2 ** 20,
                                           "within_goal": r["seconds"] <= MOBILENET_GOAL_S and
                                           r["peak_rss_mib"] * 2 ** 20 <= BUDGET + r["model_bytes"]}
                                       for b, r in mobile.items()},
                       "torchrun_minilm": {"path_following_speedup": pf_speedup, "goal": DIST_PF_GOAL,
                                           "end_to_end_speedup": med[1]["seconds"] / med[2]["seconds"],
                                           "median_seconds": med, "repeats": DIST_REPEATS,
                                           "byte_identical": len({r["sha256"] for r in dist}) == 1,
                                           "within_goal": pf_speedup >= DIST_PF_GOAL}},
           "runs": rows + dist}
    print(json.dumps(doc["summary"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
