"""End-to-end latency of the TVM export on the x86_64 host vs TVM-compiled fp32 vs onnxruntime fp32.

    python benchmarks/tvm_latency.py --out benchmarks/results/tvm_latency.json

MiniLM encoder (batch 1 x 128 real tokens) with 1-bit and ternary Linear layers, and the MNIST
CNN (batch 1 and 64 real digits) at 1-bit, all in one process:
  tvm_int8 / tvm_float   model.x86_64.so of `export --format tvm` (packed C kernels; int8 or
                         float activations)
  tvm_fp32               the uncompressed model through the same pipeline (torch.export ->
                         Relax -> tvm.compile for the same target dict -> export_library), no
                         packed layer (tvm_compile.float_library)
  ort_fp32               the uncompressed model as plain ONNX in onnxruntime
One thread everywhere (SPFQ_NUM_THREADS, TVM_NUM_THREADS, ORT intra-op threads), medians of
repeated runs after warm-up (timeit from onnx_latency.py). TVM builds use no tuning (no
MetaSchedule database): the fp32 baseline is TVM's default CPU lowering. Each row also records
the smallest row cosine of each runner's output against what it must compute (PyTorch fp32; the
dequantised model for float activations; the integer reference for int8 activations), so every
timing is of a correct computation.
arm64 libraries run here only under qemu-user emulation: their timings are not meaningful and
are not reported.
"""

from __future__ import annotations

import os

# before tvm / the kernels start their thread pools
os.environ["SPFQ_NUM_THREADS"] = "1"
os.environ["TVM_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_latency import compressed, minilm_tokens, timeit  # noqa: E402

import examples.minilm as minilm  # noqa: E402
import examples.mnist_cnn as mnist  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.export import export  # noqa: E402
from spfq_deploy.export.onnx.graph import float_graph  # noqa: E402
from spfq_deploy.export.onnx.session import session  # noqa: E402
from spfq_deploy.export.source import export_inputs  # noqa: E402
from spfq_deploy.export.tvm import compile as tvm_compile  # noqa: E402
from spfq_deploy.export.tvm import runtime as tvm_runtime  # noqa: E402
from spfq_deploy.pack import container  # noqa: E402
from spfq_deploy.reference import int8_activation_reference, load_reference  # noqa: E402
from spfq_deploy.targets import get_target  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-30)).min())


def bench_model(label, module_file, module, feeds_by_case, bits_list, work, spfq_dir, warmup, repeat, log):
    import tvm

    rows = []
    inputs = export_inputs(module, getattr(module, "calibration", None))
    fp32_onnx = work / f"{label}_fp32.onnx"
    fp32_onnx.write_bytes(float_graph(module.build(), inputs).SerializeToString())
    t0 = time.perf_counter()
    fp32_so = tvm_compile.float_library(module.build(), inputs, work / f"{label}_fp32.so", log=lambda *a: None)
    log(f"{label}: TVM fp32 compiled in {time.perf_counter() - t0:.0f} s")
    calib = module.calibration(16) if label == "minilm" else module.calibration(64)
    base = {"ort_fp32": session(fp32_onnx), "tvm_fp32": tvm_runtime.load(fp32_so)[0]}
    for bits in bits_list:
        spfq, method = compressed(label, module_file, module.build, calib, bits, work, spfq_dir)
        libs = {}
        for act in ("int8", "float"):
            out = work / f"{label}_{bits}_{act}"
            export(spfq, out, formats=("tvm",), target="x86_64", activations=act, log=lambda *a: None)
            libs[f"tvm_{act}"] = out / tvm_runtime.library_name("x86_64")
        ref = load_reference(spfq)
        ref8 = int8_activation_reference(ref, container.load(spfq))
        runners = dict(base)
        for k, path in libs.items():
            runners[k] = tvm_runtime.load(path)[0]
        for case, feeds in feeds_by_case.items():
            arrays = list(feeds.values())
            tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
            calls = {"ort_fp32": lambda s=runners["ort_fp32"]: s.run(None, feeds)}
            for k in ("tvm_fp32", "tvm_int8", "tvm_float"):
                calls[k] = lambda vm=runners[k]: vm["main"](*tensors)
            # what each runner must compute: the fp32 model; the dequantised model (float
            # activations); the integer reference (int8 activations)
            targs = [torch.from_numpy(a) for a in arrays]
            with torch.no_grad():
                want = {"ort_fp32": module.build()(*targs).numpy(), "tvm_float": ref(*targs).numpy(),
                        "tvm_int8": ref8(*targs).numpy()}
            want["tvm_fp32"] = want["ort_fp32"]
            res = {}
            for k, fn in calls.items():
                res[k] = timeit(fn, warmup, repeat)
                got = runners[k].run(None, feeds)[0] if k == "ort_fp32" else tvm_runtime.run(runners[k], *arrays)[0]
                res[k]["cos_vs_reference_min"] = _cos(got, want[k])
            for k, r in res.items():
                r["ratio_vs_tvm_fp32"] = r["median_ms"] / res["tvm_fp32"]["median_ms"]
                r["ratio_vs_ort_fp32"] = r["median_ms"] / res["ort_fp32"]["median_ms"]
            row = {"model": label, "bits": bits, "compressed_with": method, "case": case,
                   "load_avg_after": os.getloadavg(), "results": res,
                   "sizes_bytes": {"tvm_fp32": fp32_so.stat().st_size, "ort_fp32": fp32_onnx.stat().st_size,
                                   **{k: p.stat().st_size for k, p in libs.items()}}}
            rows.append(row)
            log(f"{label:7s} {str(bits):8s} {case:8s} " + "  ".join(
                f"{k} {r['median_ms']:.2f} ms" for k, r in res.items()) + f"  (load {os.getloadavg()[0]:.2f})")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tvm_latency.json")
    ap.add_argument("--spfq-dir", type=Path, help="reuse <dir>/{minilm,mnist}_<bits>.spfq when present")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime
    import tvm
    import tvm_ffi

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_model("minilm", "examples/minilm.py", minilm, {"1x128": minilm_tokens(128)},
                           [1, "ternary"], work, args.spfq_dir, args.warmup, args.repeat, print)
        digits = mnist.load_digits()[0].numpy()
        rows += bench_model("mnist", "examples/mnist_cnn.py", mnist,
                            {"batch1": {"input": digits[:1]}, "batch64": {"input": digits[:64]}},
                            [1], work, args.spfq_dir, args.warmup, args.repeat, print)
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                       "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
                       "torch": torch.__version__},
           "target": "x86_64", "tvm_target": dict(get_target("x86_64").tvm),
           "threads": 1, "warmup": args.warmup, "repeat": args.repeat, "rows": rows,
           "arm64": "not timed: the arm64 libraries run here only under qemu-user emulation",
           "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
