"""End-to-end latency of the ONNX flavours in onnxruntime vs the fp32 ONNX model, same process.

    python benchmarks/onnx_latency.py --out benchmarks/results/onnx_latency.json

MiniLM encoder (batch 1 x 128 real tokens) with 1-bit and ternary Linear layers, and the MNIST
CNN (batch 1 and 64) at 1-bit: fp32 ONNX, stock flavour (MatMulNBits at accuracy level 0 and 4),
custom-op flavour (int8 activations, and float weight-only). One thread everywhere (ORT
intra-op threads and SPFQ_NUM_THREADS), medians of repeated runs after warm-up.
Goal (PERF.md): custom-op flavour <= 0.5x the fp32 latency for MiniLM with 1-bit/ternary layers.
Latency does not depend on which codes the compressor chose, so by default the models are
compressed with round-to-nearest on a few sentences (quick); --spfq-dir reuses real files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.minilm as minilm  # noqa: E402
import examples.mnist_cnn as mnist  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.bench.worker import timeit  # noqa: E402,F401  (tvm_latency.py imports it from here)
from spfq_deploy.compress import compress_model  # noqa: E402
from spfq_deploy.export import export  # noqa: E402
from spfq_deploy.export.onnx.graph import float_graph  # noqa: E402
from spfq_deploy.export.onnx.session import session  # noqa: E402
from spfq_deploy.export.source import export_inputs  # noqa: E402
from spfq_deploy.pack import container  # noqa: E402

GOAL = 0.5


def minilm_tokens(n: int = 128) -> dict:
    """One real passage, [CLS] ... [SEP] truncated/filled to exactly n tokens."""
    ids = []
    for row in minilm._token_ids(minilm.calibration_sentences(64)):
        ids.extend(row[1:-1])
        if len(ids) >= n - 2:
            break
    ids = [row[0]] + ids[:n - 2] + [row[-1]]
    x = torch.tensor([ids], dtype=torch.int64)
    return {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())}


def compressed(name, module, build, calib, bits, work: Path, spfq_dir: Path | None):
    path = (spfq_dir / f"{name}_{bits}.spfq") if spfq_dir else None
    if path is not None and path.is_file():
        return path, container.load(path).meta.get("config", {}).get("method", "file")
    path = work / f"{name}_{bits}.spfq"
    res = compress_model(build(), calib, bits=bits, method="rtn", progress=False, model_spec=module)
    container.save(path, res.model)
    return path, "rtn"


def bench_model(label, module_file, module, feeds_by_case, bits_list, work, spfq_dir, warmup, repeat, log):
    rows = []
    inputs = export_inputs(module, getattr(module, "calibration", None))
    fp32 = work / f"{label}_fp32.onnx"
    fp32.write_bytes(float_graph(module.build(), inputs).SerializeToString())
    calib = module.calibration(16) if label == "minilm" else module.calibration(64)
    for bits in bits_list:
        spfq, method = compressed(label, module_file, module.build, calib, bits, work, spfq_dir)
        out8, outf = work / f"{label}_{bits}_int8", work / f"{label}_{bits}_float"
        export(spfq, out8, log=lambda *a: None)
        export(spfq, outf, activations="float", flavours=("custom",), log=lambda *a: None)
        lib = next((out8 / "lib").rglob("libspfq_ort.so"))
        sessions = {"fp32": session(fp32),
                    "stock_acc0": session(out8 / "model.stock.onnx", accuracy_level=0),
                    "stock_acc4": session(out8 / "model.stock.onnx", accuracy_level=4),
                    "custom_int8": session(out8 / "model.spfq.onnx", lib),
                    "custom_float": session(outf / "model.spfq.onnx", lib)}
        for case, feeds in feeds_by_case.items():
            res = {k: timeit(lambda s=s: s.run(None, feeds), warmup, repeat) for k, s in sessions.items()}
            base = res["fp32"]["median_ms"]
            for k, r in res.items():
                r["ratio_vs_fp32"] = r["median_ms"] / base
            row = {"model": label, "bits": bits, "compressed_with": method, "case": case, "results": res,
                   "sizes_bytes": {"fp32": fp32.stat().st_size,
                                   "custom": (out8 / "model.spfq.onnx").stat().st_size,
                                   "stock": (out8 / "model.stock.onnx").stat().st_size}}
            rows.append(row)
            log(f"{label:7s} {str(bits):8s} {case:12s} " + "  ".join(
                f"{k} {r['median_ms']:.2f} ms ({r['ratio_vs_fp32']:.2f}x)" for k, r in res.items()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/onnx_latency.json")
    ap.add_argument("--spfq-dir", type=Path, help="reuse <dir>/{minilm,mnist}_<bits>.spfq when present")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    os.environ["SPFQ_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_model("minilm", "examples/minilm.py", minilm, {"1x128": minilm_tokens(128)},
                           [1, "ternary"], work, args.spfq_dir, args.warmup, args.repeat, print)
        digits = mnist.load_digits()[0].numpy()
        rows += bench_model("mnist", "examples/mnist_cnn.py", mnist,
                            {"batch1": {"input": digits[:1]}, "batch64": {"input": digits[:64]}},
                            [1], work, args.spfq_dir, args.warmup, args.repeat, print)
    goal = [{"model": r["model"], "bits": r["bits"], "ratio": r["results"]["custom_int8"]["ratio_vs_fp32"],
             "goal": GOAL, "met": r["results"]["custom_int8"]["ratio_vs_fp32"] <= GOAL}
            for r in rows if r["model"] == "minilm"]
    for g in goal:
        print(f"goal: MiniLM {g['bits']} custom-op int8 = {g['ratio']:.2f}x fp32 (<= {GOAL}x): "
              f"{'met' if g['met'] else 'MISSED'}")
    import onnxruntime

    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
                       "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
           "threads": 1, "warmup": args.warmup, "repeat": args.repeat, "rows": rows, "goals": goal,
           "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
